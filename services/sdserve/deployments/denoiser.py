"""The Denoiser deployment: DenoiseRequest -> DenoiseResponse. The whole loop runs here."""

from __future__ import annotations

from ray import serve

from sdserve.deployments._common import load_stage
from sdserve.pipeline.denoise import Denoiser
from sdserve.types import tensor_from_pb, tensor_to_pb
from sdserve.v1 import stages_pb2


@serve.deployment(name="Denoiser")
class DenoiserDeployment:
    def __init__(self, config: dict):
        self.denoiser = load_stage(Denoiser, config)

    def Denoise(self, request: bytes) -> bytes:
        """Serialized `DenoiseRequest` -> serialized `DenoiseResponse`."""
        req = stages_pb2.DenoiseRequest.FromString(request)
        latents = self.denoiser.denoise(
            tensor_from_pb(req.cond),
            tensor_from_pb(req.uncond) if req.HasField("uncond") else None,
            width=req.width,
            height=req.height,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            scheduler=req.scheduler,
            seeds=list(req.seeds),
        )
        return stages_pb2.DenoiseResponse(latents=tensor_to_pb(latents)).SerializeToString()

    def Info(self, request: bytes = b"") -> bytes:
        """Serialized `DenoiserInfo`: the model's native size and latent scale."""
        width, height = self.denoiser.native_size
        return stages_pb2.DenoiserInfo(
            native_width=width,
            native_height=height,
            vae_scale_factor=self.denoiser.vae_scale_factor,
        ).SerializeToString()
