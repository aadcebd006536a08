"""The public API's own terms, shared by both edges (gRPC and HTTP) and the job queue.

- `types`: the domain types of a request, as sent (`GenerateFields`) and validated
  (`GenerateParams`), and of what the request path yields (`Queued`, `Progress`, `Preview`,
  `Result`); plain dataclasses.
- `validate`: `GenerateFields` -> `GenerateParams`, every limit checked (INVALID_ARGUMENT names
  the field).
- `served_models`: what ListModels returns.
- `proto`: those types to and from the public protobuf messages (the only module here that
  imports them).
- `auth`: API keys and their tenants.
"""
