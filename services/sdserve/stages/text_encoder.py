"""The TextEncoder stage: EncodeTextRequest -> EncodeTextResponse (CLIP embeddings)."""

from __future__ import annotations

from sdserve.config import SdserveConfig
from sdserve.metrics import StatsLogger
from sdserve.pipeline.text import TextEncoder
from sdserve.pipeline.threads import ThreadPlan, set_threads
from sdserve.stages.runtime import TorchThread, load_stage, thread_plan
from sdserve.stages.tensors import tensor_to_pb
from sdserve.v1 import stages_pb2


class TextEncoderService:
    """Tokenizes and encodes prompts on its torch thread."""

    def __init__(
        self, encoder: TextEncoder, torch_thread: TorchThread, threads: ThreadPlan | None = None
    ):
        self.encoder = encoder
        self.torch = torch_thread
        self.threads = threads
        """Torch threads for this stage's work (None: leave them as they are)."""

    @classmethod
    def from_config(
        cls, config: SdserveConfig, stats: StatsLogger, torch_thread: TorchThread | None = None
    ) -> TextEncoderService:
        """Loads `tokenizer/` and `text_encoder/` of the configured model on the torch thread
        (a new one unless given)."""
        thread = torch_thread or TorchThread("text-encoder")
        encoder = thread.call(load_stage, TextEncoder, config, "text_encoder", stats)
        return cls(encoder, thread, thread.call(thread_plan, config, "text_encoder", encoder))

    def _encode(self, req: stages_pb2.EncodeTextRequest) -> stages_pb2.EncodeTextResponse:
        if self.threads is not None:
            set_threads(self.threads.small)
        cond, uncond = self.encoder.encode(req.prompt, req.negative_prompt, req.with_uncond)
        reply = stages_pb2.EncodeTextResponse(cond=tensor_to_pb(cond))
        if uncond is not None:
            reply.uncond.CopyFrom(tensor_to_pb(uncond))
        return reply

    async def encode(self, req: stages_pb2.EncodeTextRequest) -> stages_pb2.EncodeTextResponse:
        """The prompt's embeddings, and the negative prompt's when `with_uncond`."""
        return await self.torch.run(self._encode, req)
