"""The VaeDecoder stage: DecodeRequest -> DecodeResponse (one PNG per latent)."""

from __future__ import annotations

from sdserve.config import SdserveConfig
from sdserve.metrics import StatsLogger
from sdserve.pipeline.threads import ThreadPlan, set_threads
from sdserve.pipeline.vae import VaeDecoder
from sdserve.stages.runtime import TorchThread, load_stage, thread_plan
from sdserve.stages.tensors import tensor_from_pb
from sdserve.v1 import stages_pb2


class VaeDecoderService:
    """Decodes latents and PNG-encodes the images on its torch thread."""

    def __init__(
        self, decoder: VaeDecoder, torch_thread: TorchThread, threads: ThreadPlan | None = None
    ):
        self.decoder = decoder
        self.torch = torch_thread
        self.threads = threads
        """Torch threads for this stage's work (None: leave them as they are)."""

    @classmethod
    def from_config(
        cls, config: SdserveConfig, stats: StatsLogger, torch_thread: TorchThread | None = None
    ) -> VaeDecoderService:
        """Loads `vae/` of the configured model on the torch thread (a new one unless given)."""
        thread = torch_thread or TorchThread("vae-decoder")
        decoder = thread.call(load_stage, VaeDecoder, config, "vae_decoder", stats)
        return cls(decoder, thread, thread.call(thread_plan, config, "vae_decoder", decoder))

    def _decode(self, req: stages_pb2.DecodeRequest) -> stages_pb2.DecodeResponse:
        if self.threads is not None:
            set_threads(self.threads.small)
        pngs = self.decoder.decode_png(tensor_from_pb(req.latents), list(req.parameters))
        return stages_pb2.DecodeResponse(png=pngs)

    async def decode(self, req: stages_pb2.DecodeRequest) -> stages_pb2.DecodeResponse:
        """One PNG per latent, each with its `parameters` text chunk."""
        return await self.torch.run(self._decode, req)
