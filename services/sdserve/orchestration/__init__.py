"""The request path, text encoder -> denoiser -> VAE decoder, over a `StageClient`.

`StagePath` (path.py) runs one request; it depends only on the `StageClient` interface
(client.py), which has two implementations: `InProcessStageClient` (in_process.py: the stage
services in this process, for tests and the GPU benchmark) and `sdserve.serve.client.
ServeStageClient` (the Serve deployments, in production). The stages' messages are domain
types (`sdserve.stages.messages`): nothing here imports Ray, gRPC or protobuf.
"""
