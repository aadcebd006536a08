"""Thin Ray Serve wrappers around the pipeline stages, and the application graph (app.py).

Protobuf lives here, at the edge: each stage deployment parses its stage message, calls the pure
pipeline code and serializes the reply.
"""
