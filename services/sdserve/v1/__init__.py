"""Generated protobuf code for sdserve.v1 (see protos/generate.py)."""
