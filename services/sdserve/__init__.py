"""sdserve: Stable Diffusion served as Ray Serve microservices behind a gRPC API."""

__version__ = "0.1.0"
