"""Pure torch/diffusers code: model loading, the three stages, schedulers, the tiny model.

Nothing here imports ray, grpc or redis, so the stages run and are tested in-process.
"""
