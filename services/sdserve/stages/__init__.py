"""The four stages as plain services, without Ray or protobuf: stage messages in, stage
messages out (`messages`: dataclasses holding tensors, bytes and numbers).

Each service (`TextEncoderService`, `VaeEncoderService`, `DenoiserService`, `VaeDecoderService`)
loads its part of the model and does all of its torch work on one torch thread
(`runtime.TorchThread`); its async methods only await that thread. A Serve deployment
(`sdserve.serve.stages`) is a thin shell that parses the protobuf form of a message, calls the
service and serializes its answer (`sdserve.serve.stage_messages`); the in-process stage client
(`sdserve.orchestration`) calls the services directly, in one process, for tests and the GPU
benchmark.
"""
