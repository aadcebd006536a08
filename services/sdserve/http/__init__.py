"""The HTTP edge: the OpenAI-compatible image API (`POST /v1/images/generations`, streamed
partial images, `GET /v1/models`), beside the gRPC edge (`sdserve.serve.ingress`).

- `openai_images`: OpenAI's JSON to a `GenerateRequest` and back, and its SSE events;
- `app`: the Starlette routes over the request path (`StagePath`); no Ray.

Serve's HTTP proxy reaches it through the ingress deployment.
"""
