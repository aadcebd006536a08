"""The stage messages (`sdserve.stages.messages`) to and from their protobuf form
(`protos/sdserve/v1/stages.proto`), for where a message crosses a process: the stage
deployments (`sdserve.serve.stages`) parse what they are sent and serialize what they answer,
and the Serve stage client (`sdserve.serve.client`) does the reverse. The in-process stage
client serializes nothing.

Each `X_from_pb` inverts `X_to_pb`. A tensor is read from a message as a `PackedTensor` (its
bytes): the ingress passes it on as it came, and a stage unpacks it on its torch thread
(`sdserve.stages.tensors`), so this module never imports torch. Floats that the wire carries as
float32 (guidance_stop, strength) come back as the caller wrote them (six decimals), as the
Denoiser always read them.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from sdserve.stages.messages import (
    CheckedImages,
    CheckImages,
    ControlInput,
    ControlNetFile,
    Decode,
    Denoise,
    Denoised,
    DenoiseEvent,
    DenoiseQueued,
    DenoiserInfo,
    DenoiserStats,
    DenoiseStep,
    EncodeImage,
    EncodeText,
    ImageEncoding,
    LoraFile,
    LoraScales,
    PackedTensor,
    StageInfo,
    Tensor,
    TextEmbeddings,
)
from sdserve.v1 import stages_pb2

# --- Tensors ----------------------------------------------------------------------------------


def tensor_to_pb(tensor: Tensor) -> stages_pb2.Tensor:
    """dtype + shape + raw bytes, of a packed tensor as it is or of a torch tensor."""
    if not isinstance(tensor, PackedTensor):
        from sdserve.stages.tensors import pack  # holding a torch tensor, torch is imported

        tensor = pack(tensor)
    return stages_pb2.Tensor(dtype=tensor.dtype, shape=tensor.shape, data=tensor.data)


def tensor_from_pb(msg: stages_pb2.Tensor) -> PackedTensor:
    """Inverse of `tensor_to_pb` (`sdserve.stages.tensors.unpack` makes it a torch tensor)."""
    return PackedTensor(msg.dtype, tuple(msg.shape), msg.data)


def _optional(message, name: str) -> PackedTensor | None:
    """The tensor of a message's Tensor field, or None when it is unset."""
    return tensor_from_pb(getattr(message, name)) if message.HasField(name) else None


def _set_tensors(message, **tensors: Tensor | None) -> None:
    """Sets each Tensor field whose tensor is not None."""
    for name, tensor in tensors.items():
        if tensor is not None:
            getattr(message, name).CopyFrom(tensor_to_pb(tensor))


def _loras_to_pb(loras: LoraScales) -> list[stages_pb2.LoraScale]:
    return [stages_pb2.LoraScale(name=name, scale=scale) for name, scale in loras]


def _loras_from_pb(loras) -> LoraScales:
    return tuple((lora.name, lora.scale) for lora in loras)


# --- TextEncoder ------------------------------------------------------------------------------


def encode_text_to_pb(req: EncodeText) -> stages_pb2.EncodeTextRequest:
    return stages_pb2.EncodeTextRequest(
        request_id=req.request_id, prompt=req.prompt, negative_prompt=req.negative_prompt,
        with_uncond=req.with_uncond, loras=_loras_to_pb(req.loras),
        max_sequence_length=req.max_sequence_length,
    )  # fmt: skip


def encode_text_from_pb(pb: stages_pb2.EncodeTextRequest) -> EncodeText:
    return EncodeText(pb.request_id, pb.prompt, pb.negative_prompt, pb.with_uncond,
                      _loras_from_pb(pb.loras), pb.max_sequence_length)  # fmt: skip


def embeddings_to_pb(
    embeddings: TextEmbeddings, message: stages_pb2.DenoiseRequest | None = None
) -> stages_pb2.EncodeTextResponse:
    """An `EncodeTextResponse`, or the same four fields set in `message` (a DenoiseRequest)."""
    message = stages_pb2.EncodeTextResponse() if message is None else message
    _set_tensors(message, **{f.name: getattr(embeddings, f.name) for f in fields(embeddings)})
    return message


def embeddings_from_pb(pb: stages_pb2.EncodeTextResponse) -> TextEmbeddings:
    """From an `EncodeTextResponse`, or from a DenoiseRequest (the same four fields)."""
    return TextEmbeddings(
        cond=_optional(pb, "cond"),
        uncond=_optional(pb, "uncond"),
        cond_pooled=_optional(pb, "cond_pooled"),
        uncond_pooled=_optional(pb, "uncond_pooled"),
    )


# --- VaeEncoder -------------------------------------------------------------------------------


def encode_image_to_pb(req: EncodeImage) -> stages_pb2.EncodeImageRequest:
    return stages_pb2.EncodeImageRequest(request_id=req.request_id, init_image=req.init_image,
                                         mask_image=req.mask_image)  # fmt: skip


def encode_image_from_pb(pb: stages_pb2.EncodeImageRequest) -> EncodeImage:
    return EncodeImage(pb.request_id, pb.init_image, pb.mask_image)


def encoded_to_pb(encoded: ImageEncoding) -> stages_pb2.EncodeImageResponse:
    reply = stages_pb2.EncodeImageResponse(
        image=tensor_to_pb(encoded.image), scaling_factor=encoded.scaling_factor
    )
    if encoded.mask is not None:
        _set_tensors(reply, masked_image=encoded.masked, mask=encoded.mask)
    return reply


def encoded_from_pb(pb: stages_pb2.EncodeImageResponse) -> ImageEncoding:
    has_mask = pb.HasField("mask")
    return ImageEncoding(
        image=tensor_from_pb(pb.image),
        scaling_factor=pb.scaling_factor,
        masked=tensor_from_pb(pb.masked_image) if has_mask else None,
        mask=tensor_from_pb(pb.mask) if has_mask else None,
    )


# --- Denoiser ---------------------------------------------------------------------------------


def denoise_to_pb(req: Denoise) -> stages_pb2.DenoiseRequest:
    pb = stages_pb2.DenoiseRequest(
        request_id=req.request_id,
        width=req.width,
        height=req.height,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        scheduler=req.scheduler,
        seeds=req.seeds,
        preview_every=req.preview_every,
        timeout_s=req.timeout_s,
        progress_interval_s=req.progress_interval_s,
        guidance_stop=req.guidance_stop,
        cache_interval=req.cache_interval,
        loras=_loras_to_pb(req.loras),
        controls=[stages_pb2.ControlInput(**asdict(c)) for c in req.controls],
        request_class=req.request_class,
        priority=req.priority,
        tenant=req.tenant,
    )
    embeddings_to_pb(req.embeddings, pb)
    if req.t5 is not None:
        _set_tensors(pb, t5_cond=req.t5.cond, t5_uncond=req.t5.uncond)
        pb.true_cfg_scale, pb.shift = req.true_cfg_scale, req.shift
    if req.init is not None:
        pb.init.CopyFrom(encoded_to_pb(req.init))
        pb.strength = req.strength
    return pb


def denoise_from_pb(pb: stages_pb2.DenoiseRequest) -> Denoise:
    has_init = pb.HasField("init")
    return Denoise(
        request_id=pb.request_id,
        embeddings=embeddings_from_pb(pb),
        width=pb.width,
        height=pb.height,
        steps=pb.steps,
        guidance_scale=pb.guidance_scale,
        scheduler=pb.scheduler,
        seeds=tuple(pb.seeds),
        preview_every=pb.preview_every,
        timeout_s=pb.timeout_s,
        progress_interval_s=pb.progress_interval_s,
        init=encoded_from_pb(pb.init) if has_init else None,
        # float32 fields: six decimals give back the client's 0.7 (int(10 * 0.7) = 7 steps)
        strength=round(pb.strength, 6) if has_init else 1.0,
        guidance_stop=round(pb.guidance_stop, 6) or 1.0,  # 0: unset, every step
        cache_interval=max(1, pb.cache_interval),
        loras=_loras_from_pb(pb.loras),
        controls=tuple(map(_control_from_pb, pb.controls)),
        t5=TextEmbeddings(_optional(pb, "t5_cond"), _optional(pb, "t5_uncond"))
        if pb.HasField("t5_cond")
        else None,
        true_cfg_scale=round(pb.true_cfg_scale, 6) or 1.0,
        shift=round(pb.shift, 6),
        request_class=pb.request_class or "interactive",
        priority=pb.priority,
        tenant=pb.tenant,
    )


def _control_from_pb(c: stages_pb2.ControlInput) -> ControlInput:
    return ControlInput(c.name, c.pixels, round(c.scale, 6), round(c.start, 6), round(c.end, 6),
                        c.guess_mode)  # fmt: skip


def denoised_to_pb(denoised: Denoised) -> stages_pb2.DenoiseResponse:
    latents = tensor_to_pb(denoised.latents)
    return stages_pb2.DenoiseResponse(latents=latents, queue_s=denoised.queue_s,
                                      paused_s=denoised.paused_s)  # fmt: skip


def denoised_from_pb(pb: stages_pb2.DenoiseResponse) -> Denoised:
    return Denoised(tensor_from_pb(pb.latents), pb.queue_s, pb.paused_s)


def denoise_event_to_pb(event: DenoiseEvent) -> stages_pb2.DenoiseEvent:
    if isinstance(event, DenoiseQueued):
        return stages_pb2.DenoiseEvent(queued=stages_pb2.DenoiseQueued(position=event.position))
    if isinstance(event, DenoiseStep):
        step = stages_pb2.DenoiseStep(step=event.step, total=event.total,
                                      elapsed_s=event.elapsed_s,
                                      preview_png=event.preview_pngs)  # fmt: skip
        return stages_pb2.DenoiseEvent(step=step)
    return stages_pb2.DenoiseEvent(done=denoised_to_pb(event))


def denoise_event_from_pb(pb: stages_pb2.DenoiseEvent) -> DenoiseEvent:
    kind = pb.WhichOneof("event")
    if kind == "queued":
        return DenoiseQueued(pb.queued.position)
    if kind == "step":
        s = pb.step
        return DenoiseStep(s.step, s.total, s.elapsed_s, tuple(s.preview_png))
    if kind == "done":
        return denoised_from_pb(pb.done)
    raise ValueError("a DenoiseEvent with no event set")


def denoiser_info_to_pb(info: DenoiserInfo) -> stages_pb2.DenoiserInfo:
    plain = {f.name: getattr(info, f.name) for f in fields(info)}
    loras = [stages_pb2.LoraFile(**asdict(lora)) for lora in info.loras]
    nets = [stages_pb2.ControlNetFile(**asdict(net)) for net in info.controlnets]
    return stages_pb2.DenoiserInfo(**{**plain, "loras": loras, "controlnets": nets,
                                      "stage": stage_info_to_pb(info.stage)})  # fmt: skip


def denoiser_info_from_pb(pb: stages_pb2.DenoiserInfo) -> DenoiserInfo:
    plain = {f.name: getattr(pb, f.name) for f in fields(DenoiserInfo)}
    loras = tuple(LoraFile(f.name, f.file_bytes, f.loaded) for f in pb.loras)
    nets = tuple(ControlNetFile(f.name, f.file_bytes, f.loaded, f.misfit) for f in pb.controlnets)
    return DenoiserInfo(**{**plain, "loras": loras, "controlnets": nets,
                           "stage": stage_info_from_pb(pb.stage)})  # fmt: skip


def denoiser_stats_to_pb(stats: DenoiserStats) -> stages_pb2.DenoiserStats:
    return stages_pb2.DenoiserStats(**asdict(stats))


def denoiser_stats_from_pb(pb: stages_pb2.DenoiserStats) -> DenoiserStats:
    return DenoiserStats(**{f.name: getattr(pb, f.name) for f in fields(DenoiserStats)})


# --- VaeDecoder and every stage's Info --------------------------------------------------------


def decode_to_pb(req: Decode) -> stages_pb2.DecodeRequest:
    return stages_pb2.DecodeRequest(request_id=req.request_id, latents=tensor_to_pb(req.latents),
                                    parameters=req.parameters)  # fmt: skip


def decode_from_pb(pb: stages_pb2.DecodeRequest) -> Decode:
    return Decode(pb.request_id, tensor_from_pb(pb.latents), tuple(pb.parameters))


def pngs_to_pb(pngs: tuple[bytes, ...]) -> stages_pb2.DecodeResponse:
    return stages_pb2.DecodeResponse(png=pngs)


def pngs_from_pb(pb: stages_pb2.DecodeResponse) -> tuple[bytes, ...]:
    return tuple(pb.png)


def check_images_to_pb(req: CheckImages) -> stages_pb2.CheckImagesRequest:
    return stages_pb2.CheckImagesRequest(request_id=req.request_id, png=req.pngs)


def check_images_from_pb(pb: stages_pb2.CheckImagesRequest) -> CheckImages:
    return CheckImages(pb.request_id, tuple(pb.png))


def checked_to_pb(checked: CheckedImages) -> stages_pb2.CheckImagesResponse:
    return stages_pb2.CheckImagesResponse(png=checked.pngs, nsfw=checked.nsfw,
                                          blocked=checked.blocked)  # fmt: skip


def checked_from_pb(pb: stages_pb2.CheckImagesResponse) -> CheckedImages:
    return CheckedImages(tuple(pb.png), tuple(pb.nsfw), tuple(pb.blocked))


def stage_info_to_pb(info: StageInfo) -> stages_pb2.StageInfo:
    return stages_pb2.StageInfo(**asdict(info))


def stage_info_from_pb(pb: stages_pb2.StageInfo) -> StageInfo:
    return StageInfo(**{f.name: getattr(pb, f.name) for f in fields(StageInfo)})
