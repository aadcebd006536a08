"""The public API's protobuf messages (`sdserve.v1.diffusion_pb2`) to and from its domain types.

Both edges and the job queue convert here, and nowhere else: the gRPC ingress parses each
`GenerateRequest` into `GenerateFields` (`fields_from_pb`) and answers with the messages made of
a `Result` and the stream's events; SubmitJob stores the validated request as a
`GenerateRequest` with every field set (`params_to_pb`), and the job runner stores its result as
a `GenerateResponse`.
"""

from __future__ import annotations

import dataclasses

from sdserve.api.served_models import ServedModel
from sdserve.api.types import (
    ControlFields,
    ControlParams,
    GenerateEvent,
    GenerateFields,
    GenerateParams,
    Preview,
    Progress,
    Queued,
    Result,
)
from sdserve.errors import InvalidArgument
from sdserve.v1 import diffusion_pb2

_OPTIONAL = ("width", "height", "steps", "guidance_scale", "seed", "num_images", "strength",
             "guidance_stop", "cache_interval", "max_sequence_length", "true_cfg_scale",
             "shift")  # fmt: skip
"""The request's `optional` fields: None in `GenerateFields` when unset."""


def fields_from_pb(request: diffusion_pb2.GenerateRequest) -> GenerateFields:
    """The request's fields as sent (its `preview_every` aside), to validate."""
    optional = {name: getattr(request, name) if request.HasField(name) else None
                for name in _OPTIONAL}  # fmt: skip
    loras = tuple((lora.name, lora.scale if lora.HasField("scale") else None)
                  for lora in request.loras)  # fmt: skip
    return GenerateFields(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        scheduler=request.scheduler,
        init_image=request.init_image,
        mask_image=request.mask_image,
        model=request.model,
        loras=loras,
        controls=tuple(map(control_from_pb, request.controls)),
        **optional,
    )


def control_from_pb(control: diffusion_pb2.Control) -> ControlFields:
    """A `controls` entry as sent (unset optional fields: None)."""
    optional = {name: getattr(control, name) if control.HasField(name) else None
                for name in ("scale", "start", "end", "canny_low", "canny_high")}  # fmt: skip
    return ControlFields(name=control.name, image=control.image, guess_mode=control.guess_mode,
                         preprocess=control.preprocess, **optional)  # fmt: skip


def controls_to_pb(controls: tuple[ControlParams, ...], *,
                   images: bool = True) -> list[diffusion_pb2.Control]:  # fmt: skip
    """Every field set (`images` False: their images left out, as a reply shows them)."""
    return [diffusion_pb2.Control(
        name=c.name, image=c.image if images else b"", scale=c.scale, start=c.start, end=c.end,
        guess_mode=c.guess_mode, preprocess=c.preprocess, canny_low=c.canny_low,
        canny_high=c.canny_high) for c in controls]  # fmt: skip


def params_to_pb(params: GenerateParams) -> diffusion_pb2.GenerateRequest:
    """The request that reproduces `params` exactly (every optional field set; a diffusion
    transformer's where it differs from unset, `transformer_fields`)."""
    return diffusion_pb2.GenerateRequest(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
        scheduler=params.scheduler,
        num_images=params.num_images,
        init_image=params.init_image,
        mask_image=params.mask_image,
        **({"strength": params.strength} if params.init_image else {}),
        guidance_stop=params.guidance_stop,
        cache_interval=params.cache_interval,
        model=params.model,
        loras=loras_to_pb(params.loras),
        controls=controls_to_pb(params.controls),
        **transformer_fields(params),
    )


_TRANSFORMER = {f.name: f.default for f in dataclasses.fields(GenerateParams)
                if f.name in ("max_sequence_length", "true_cfg_scale", "shift")}  # fmt: skip
"""The diffusion transformers' fields, and the value each has when unset (0, 1.0, 0.0)."""


def transformer_fields(params: GenerateParams) -> dict:
    """The diffusion transformers' fields that `params` sets: none of a U-Net model's request
    (which would refuse them when the stored job is validated again)."""
    return {name: getattr(params, name) for name, unset in _TRANSFORMER.items()
            if getattr(params, name) != unset}  # fmt: skip


def loras_to_pb(loras: tuple[tuple[str, float], ...]) -> list[diffusion_pb2.LoraWeight]:
    return [diffusion_pb2.LoraWeight(name=n, scale=s) for n, s in loras]


def resolved_to_pb(params: GenerateParams) -> diffusion_pb2.ResolvedParameters:
    """What the server resolved the request to (a reply's `parameters`)."""
    return diffusion_pb2.ResolvedParameters(
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        scheduler=params.scheduler,
        strength=params.strength,
        guidance_stop=params.guidance_stop,
        cache_interval=params.cache_interval,
        model=params.model,
        loras=loras_to_pb(params.loras),
        controls=controls_to_pb(params.controls, images=False),
        max_sequence_length=params.max_sequence_length,
        true_cfg_scale=params.true_cfg_scale,
        shift=params.shift,
    )


def result_to_pb(result: Result) -> diffusion_pb2.GenerateResponse:
    """Generate's reply (and a job's stored result)."""
    p = result.params
    nsfw = result.nsfw or (False,) * len(result.pngs)
    blocked = result.blocked or (False,) * len(result.pngs)
    images = [diffusion_pb2.Image(png=png, seed=seed, width=p.width, height=p.height, nsfw=n,
                                  blocked=b)
              for png, seed, n, b in zip(result.pngs, p.seeds, nsfw, blocked,
                                         strict=True)]  # fmt: skip
    return diffusion_pb2.GenerateResponse(
        images=images,
        timings=diffusion_pb2.StageTimings(**vars(result.timings)),
        request_id=result.request_id,
        parameters=resolved_to_pb(p),
    )


def event_to_pb(event: GenerateEvent) -> diffusion_pb2.GenerateEvent:
    """One GenerateStream message."""
    if isinstance(event, Queued):
        queued = diffusion_pb2.Queued(position=event.position, request_id=event.request_id)
        return diffusion_pb2.GenerateEvent(queued=queued)
    if isinstance(event, Progress):
        progress = diffusion_pb2.Progress(step=event.step, total=event.total,
                                          elapsed_s=event.elapsed_s)  # fmt: skip
        return diffusion_pb2.GenerateEvent(progress=progress)
    if isinstance(event, Preview):
        preview = diffusion_pb2.Preview(step=event.step, png=event.pngs)
        return diffusion_pb2.GenerateEvent(preview=preview)
    if isinstance(event, Result):
        return diffusion_pb2.GenerateEvent(result=result_to_pb(event))
    raise TypeError(f"not a GenerateEvent: {event!r}")


# --- Models -----------------------------------------------------------------------------------


def served_model_to_pb(model: ServedModel) -> diffusion_pb2.ModelInfo:
    stages = [diffusion_pb2.ModelStage(stage=s.stage, device=s.device, dtype=s.dtype,
                                       compile=s.compile) for s in model.stages]  # fmt: skip
    return diffusion_pb2.ModelInfo(
        name=model.name,
        family=model.family,
        native_width=model.native_size[0],
        native_height=model.native_size[1],
        prediction_type=model.prediction_type,
        default_scheduler=model.default_scheduler,
        inpainting=model.inpainting,
        image_inputs=model.image_inputs,
        stages=stages,
    )


# --- Jobs -------------------------------------------------------------------------------------

_PRIORITY_NAMES = {
    diffusion_pb2.JOB_PRIORITY_UNSPECIFIED: "normal",
    diffusion_pb2.JOB_PRIORITY_HIGH: "high",
    diffusion_pb2.JOB_PRIORITY_NORMAL: "normal",
    diffusion_pb2.JOB_PRIORITY_LOW: "low",
}
_PRIORITY_VALUES = {"high": diffusion_pb2.JOB_PRIORITY_HIGH,
                    "normal": diffusion_pb2.JOB_PRIORITY_NORMAL,
                    "low": diffusion_pb2.JOB_PRIORITY_LOW}  # fmt: skip


def job_priority_name(priority: int) -> str:
    """The queue's name for a JobPriority value. Raises InvalidArgument for unknown values."""
    try:
        return _PRIORITY_NAMES[priority]
    except KeyError:
        raise InvalidArgument("priority", f"unknown value {priority}") from None


def job_to_pb(record, webhook_attempts=()) -> diffusion_pb2.Job:
    """A job record (`sdserve.jobs.records.JobRecord`, which lives a layer above) as the public
    `Job` message, with its images when `record.result` is set, and the attempts at delivering
    its end (`sdserve.jobs.webhook_outbox.Attempt`s)."""
    job = diffusion_pb2.Job(
        job_id=record.job_id,
        state=diffusion_pb2.JobState.Value(f"JOB_STATE_{record.state.value}"),
        priority=_PRIORITY_VALUES.get(record.priority, diffusion_pb2.JOB_PRIORITY_NORMAL),
        step=record.step,
        total_steps=record.total_steps,
        attempts=record.attempts,
        error=record.error,
        created_at=record.created_at,
        started_at=record.started_at or 0.0,
        finished_at=record.finished_at or 0.0,
        cancel_requested=record.cancel_requested,
        worker=record.worker,
        callback_url=record.callback_url,
        webhook_attempts=[
            diffusion_pb2.WebhookAttempt(at=a.at, status=a.status or 0, error=a.error)
            for a in webhook_attempts
        ],  # fmt: skip
    )
    if record.result is not None:
        job.result.ParseFromString(record.result)
    return job
