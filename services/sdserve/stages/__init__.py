"""The four stages as plain services, without Ray: stage messages in, stage messages out.

Each service (`TextEncoderService`, `VaeEncoderService`, `DenoiserService`, `VaeDecoderService`)
loads its part of the model and does all of its torch work on one torch thread
(`runtime.TorchThread`); its async methods only await that thread. A Serve deployment
(`sdserve.serve.stages`) is a thin shell that parses and serializes the messages; the
in-process stage client (`sdserve.orchestration`) calls the services directly, in one process,
for tests and the GPU benchmark.
"""
