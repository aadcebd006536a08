"""Names shared by the config tree and the pipeline, in a module with no dependencies (the
pipeline runs on machines that have only torch, transformers and diffusers)."""

SCHEDULER_NAMES = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m")
"""Sampler names the API accepts (see sdserve.pipeline.schedulers)."""
