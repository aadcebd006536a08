"""Inference maths in pure torch/diffusers: model loading, the text encoder, the denoising loop
and its step-level batching engine, schedulers, the VAE decoder.

Nothing here imports ray, grpc or redis, so the stages run and are tested in-process.
"""
