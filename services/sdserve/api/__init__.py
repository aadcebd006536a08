"""The public API's own terms, shared by both edges (gRPC and HTTP) and the job queue."""
