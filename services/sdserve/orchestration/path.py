"""The one request path: text encoder (and VAE encoder for image inputs) -> denoiser -> VAE
decoder (-> safety checker, where the model has one), over a `StageClient`.

The gRPC ingress runs it for Generate/GenerateStream and the job runner for queued jobs, so
jobs and synchronous requests share the Denoiser's running batch. It never computes on a
tensor: embeddings and latents pass from one stage to the next in stage messages
(`sdserve.stages.messages`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping

from sdserve.api.served_models import ServedModel
from sdserve.api.types import (
    GenerateEvent,
    GenerateFields,
    GenerateParams,
    Preview,
    Progress,
    Queued,
    Result,
    Timings,
)
from sdserve.api.validate import validate_fields_async
from sdserve.config import DefaultsConfig, ModelConfig, SdserveConfig
from sdserve.constants import DIT_DEFAULTS, DIT_FAMILIES
from sdserve.errors import DeadlineExceeded, Internal, InvalidArgument
from sdserve.metrics import StatsLogger
from sdserve.orchestration import safety
from sdserve.orchestration.client import StageClient
from sdserve.orchestration.deadlines import Within, check_deadline
from sdserve.orchestration.denoise_request import INTERACTIVE, Who, denoise_request
from sdserve.orchestration.families import (
    check_transformer_request,
    check_unet_request,
    with_uncond,
)
from sdserve.pipeline.control_images import control_pixels
from sdserve.stages.messages import (
    ControlInput,
    ControlNetFile,
    Decode,
    Denoise,
    Denoised,
    DenoiseQueued,
    DenoiserInfo,
    DenoiseStep,
    EncodeImage,
    EncodeText,
    ImageEncoding,
    LoraFile,
    TextEmbeddings,
)
from sdserve.stats import DeadlineOutcome, RequestServed

logger = logging.getLogger(__name__)


DENOISER_GRACE_S = 0.5
"""How much longer than the deadline the Denoiser's call may take: the Denoiser is given the
deadline and answers it itself (the request counted as expired, never decoded); the request
path's own bound is for a Denoiser that does not answer at all."""


class StagePath:
    """Runs requests through the stages of the model each names, many at a time."""

    def __init__(
        self,
        clients: StageClient | Mapping[str, StageClient],
        config: SdserveConfig,
        stats: StatsLogger | None = None,
    ):
        """`clients`: one per served model, {name: client} with the default model first, or
        one client for a server of one model (the config's default)."""
        if isinstance(clients, StageClient):
            clients = {config.model_named().name: clients}
        self.clients = dict(clients)
        self.default_model = next(iter(self.clients))
        self.client = self.clients[self.default_model]
        """The default model's stage client."""
        self.config = config
        self.stats = stats or StatsLogger()
        self._info: dict[str, DenoiserInfo] = {}
        self.inflight: Counter[str] = Counter()
        """Requests running now, by model (what removing a model waits on)."""

    def add_model(self, model: ModelConfig, client: StageClient) -> None:
        """Serves `model` (added at runtime) from now on."""
        self.clients[model.name] = client
        self.config = self.config.with_model(model)

    def remove_model(self, name: str) -> None:
        """Takes no new request for `name` from now on; the running ones go on."""
        self.clients.pop(name, None)
        self._info.pop(name, None)
        self.config = self.config.without_model(name)

    async def denoiser_info(self, model: str | None = None) -> DenoiserInfo:
        """A model's native size and the like (default: the default model's); asking it also
        checks that its Denoiser answers."""
        model = model or self.default_model
        if model not in self._info:
            self._info[model] = await self.clients[model].denoiser_info()
        return self._info[model]

    async def models(self) -> list[ServedModel]:
        """Every served model, the default first."""
        infos = await asyncio.gather(*(self.denoiser_info(name) for name in self.clients))
        stages = await asyncio.gather(*(c.stage_infos() for c in self.clients.values()))
        return [ServedModel.from_info(name, info, self._defaults(name, info.family).scheduler,
                                      runs)
                for name, info, runs in zip(self.clients, infos, stages, strict=True)]  # fmt: skip

    def _defaults(self, model: str, family: str = "") -> DefaultsConfig:
        """The defaults of requests to `model`: the shared ones, with its own sampler; a
        diffusion transformer's pipeline's own (`DIT_DEFAULTS`)."""
        if family in DIT_DEFAULTS:
            return self.config.defaults.model_copy(update=DIT_DEFAULTS[family])
        try:
            scheduler = self.config.model_named(model).scheduler
        except KeyError:  # a path built on clients the config does not name (tests)
            scheduler = None
        defaults = self.config.defaults
        return defaults.model_copy(update={"scheduler": scheduler}) if scheduler else defaults

    def _model(self, name: str) -> str:
        """The served model a request names (empty: the default). Raises InvalidArgument."""
        name = name or self.default_model
        if name not in self.clients:
            raise InvalidArgument("model", f"unknown model {name!r}; this server serves "
                                  f"{', '.join(self.clients)}")  # fmt: skip
        return name

    async def loras(self, model: str = "") -> tuple[str, list[LoraFile]]:
        """(the model's name, its adapter files as its Denoiser sees them now)."""
        model = self._model(model)
        self._info[model] = await self.clients[model].denoiser_info()
        return model, list(self._info[model].loras)

    async def _check_loras(self, model: str, loras: tuple[tuple[str, float], ...]) -> None:
        """Every adapter a request names exists for its model (the list is read again when
        one is not known yet: adapters may be added while serving). Raises InvalidArgument."""
        known = {f.name for f in (await self.denoiser_info(model)).loras}
        if any(name not in known for name, _ in loras):
            known = {f.name for f in (await self.loras(model))[1]}
        for i, (name, _) in enumerate(loras):
            if name not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise InvalidArgument(f"loras[{i}].name", f"model {model!r} has no adapter "
                                      f"{name!r}; it has: {listed}")  # fmt: skip

    async def controlnets(self, model: str = "") -> tuple[str, list[ControlNetFile]]:
        """(the model's name, its ControlNets as its Denoiser sees them now)."""
        model = self._model(model)
        self._info[model] = await self.clients[model].denoiser_info()
        return model, list(self._info[model].controlnets)

    async def _check_controls(self, model: str, params: GenerateParams) -> None:
        """Every ControlNet a request names exists for its model and fits its U-Net (the list
        is read again when one is not known yet). Raises InvalidArgument."""
        known = {f.name: f for f in (await self.denoiser_info(model)).controlnets}
        if any(c.name not in known for c in params.controls):
            known = {f.name: f for f in (await self.controlnets(model))[1]}
        for i, control in enumerate(params.controls):
            net = known.get(control.name)
            if net is None:
                listed = ", ".join(sorted(known)) or "none"
                raise InvalidArgument(f"controls[{i}].name", f"model {model!r} has no "
                                      f"ControlNet {control.name!r}; it has: {listed}")  # fmt: skip
            if net.misfit:
                raise InvalidArgument(f"controls[{i}].name", net.misfit)

    async def validate(self, fields: GenerateFields) -> GenerateParams:
        """The request's parameters, defaults filled in (the model's own among them), checked
        against the limits and against the model it names. Raises InvalidArgument."""
        model = self._model(fields.model)
        info = await self.denoiser_info(model)
        params = await validate_fields_async(
            fields,
            limits=self.config.limits,
            defaults=self._defaults(model, info.family),
            native_size=info.native_size,
            model=model,
        )
        if info.family in DIT_FAMILIES:
            return check_transformer_request(params, fields, model, info)
        check_unet_request(params, fields, model)
        if params.loras:
            await self._check_loras(model, params.loras)
        if params.controls:
            await self._check_controls(model, params)
        if params.init_image and info.family == "sdxl":
            raise InvalidArgument("init_image", f"model {model!r} is an SDXL model, which "
                                  "takes no image inputs in this version")  # fmt: skip
        if info.unet_in_channels == 9 and not params.mask_image:
            raise InvalidArgument(
                "mask_image", f"model {model!r} is an inpainting model (a 9-channel U-Net): "
                "every request needs init_image and mask_image",
            )  # fmt: skip
        return params

    async def run(
        self,
        params: GenerateParams,
        *,
        request_id: str = "",
        stream: bool = False,
        preview_every: int = 0,
        progress_interval_s: float = 0.0,
        deadline: float | None = None,
        who: Who = INTERACTIVE,
    ) -> AsyncIterator[GenerateEvent]:
        """Runs one request. With `stream` it yields Queued, a Progress per step (at most one
        every `progress_interval_s`, and always the last), a Preview every `preview_every`
        steps, then the Result; without, only the Result. Closing the iterator early cancels
        the stage call in flight. `who`: its class, priority and tenant, which the Denoiser
        schedules by (`sdserve.pipeline.scheduling`).

        Every stage call is bounded by `deadline` (time.time(); None: `engine.max_request_s`
        from now): one that has not answered by then is cancelled, and the request ends with
        DeadlineExceeded. A request with a deadline counts as met or missed, by class."""
        events = self._run(params, request_id, stream, preview_every, progress_interval_s,
                           deadline, who)  # fmt: skip
        model = params.model or self.default_model
        self.inflight[model] += 1
        try:
            async for event in events:
                if isinstance(event, Result) and deadline is not None:  # (callers stop here)
                    self.stats.record(DeadlineOutcome(who.request_class, time.time() <= deadline))
                yield event
        except DeadlineExceeded:
            if deadline is not None:
                self.stats.record(DeadlineOutcome(who.request_class, met=False))
            raise
        finally:
            self.inflight[model] -= 1

    async def _run(self, params: GenerateParams, request_id: str, stream: bool,
                   preview_every: int, progress_interval_s: float, deadline: float | None,
                   who: Who) -> AsyncIterator[GenerateEvent]:  # fmt: skip
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        client = self.clients[self._model(params.model)]  # (InvalidArgument once removed)
        left = deadline - time.time() if deadline is not None else self.config.engine.max_request_s
        within = Within(asyncio.get_running_loop().time() + left, request_id)
        logger.info(
            "request %s: model %s, %dx%d, %d steps of %s, guidance %g, %d image(s), seed %d",
            request_id, params.model, params.width, params.height, params.steps,
            params.scheduler, params.guidance_scale, params.num_images, params.seed,
        )  # fmt: skip

        # 1. Encode the prompt (and the negative prompt when guidance is on), and any image
        #    input at the same time; prepare the control images meanwhile (a worker thread).
        #    A diffusion transformer's T5 encodes at the same time, in its own stage or not.
        check_deadline(deadline, request_id, "before the text encoder")
        texts = self._encode_texts(client, params, request_id)
        ((embeddings, t5), text_s), (init, image_s), controls = await asyncio.gather(
            _timed(within(texts, "text encoder")),
            _timed(within(self._encode_image(client, params, request_id), "VAE encoder")),
            asyncio.to_thread(_control_inputs, params) if params.controls else _nothing(),
        )

        # 2. Denoise: the request joins the Denoiser's running batch for all its steps.
        t = time.perf_counter()
        denoise = denoise_request(
            params, request_id, embeddings, init, controls, t5,
            preview_every=safety.preview_every(self.config, params.model, preview_every)
            if stream else 0,
            progress_interval_s=progress_interval_s,
            timeout_s=check_deadline(deadline, request_id, "before the denoiser"), who=who,
        )  # fmt: skip
        if stream:
            denoised = None
            events = self._denoise_events(client, denoise, started)
            async for event in within.each(events, "denoiser", DENOISER_GRACE_S):
                if isinstance(event, Denoised):
                    denoised = event
                else:
                    yield event
            if denoised is None:
                raise Internal("the Denoiser's stream ended without latents")
        else:
            denoised = await within(client.denoise(denoise), "denoiser", DENOISER_GRACE_S)
        latents, denoise_s = denoised.latents, time.perf_counter() - t

        # 3. Decode the latents to PNGs, each carrying its generation parameters.
        check_deadline(deadline, request_id, "before the VAE decoder")
        t = time.perf_counter()
        texts = tuple(params.png_parameters(s, params.model) for s in params.seeds)
        pngs = await within(client.decode(Decode(request_id, latents, texts)), "VAE decoder")
        vae_s = time.perf_counter() - t

        # 4. The safety checker, where the model has one: marks (or blacks out) each image.
        checked, safety_s = await _timed(within(safety.check_images(client, request_id, pngs),
                                                "safety checker"))  # fmt: skip

        timings = Timings(text_s, denoise_s, vae_s, total_s=time.perf_counter() - started,
                          vae_encoder_s=image_s if init is not None else 0.0,
                          denoiser_queue_s=denoised.queue_s, denoiser_paused_s=denoised.paused_s,
                          safety_checker_s=safety_s if checked.nsfw else 0.0)  # fmt: skip
        seconds = {"text_encoder": text_s, "denoiser": denoise_s, "vae_decoder": vae_s}
        if init is not None:
            seconds["vae_encoder"] = image_s
        if checked.nsfw:
            seconds["safety_checker"] = safety_s
        self.stats.record(RequestServed(len(pngs), seconds, params.model))
        logger.info(
            "request %s done in %.3fs (text %.3fs, denoise %.3fs, vae %.3fs)",
            request_id, timings.total_s, text_s, denoise_s, vae_s,
        )  # fmt: skip
        yield Result(request_id, params, checked.pngs, timings, checked.nsfw, checked.blocked)

    async def _encode_texts(
        self, client: StageClient, params: GenerateParams, request_id: str
    ) -> tuple[TextEmbeddings, TextEmbeddings | None]:
        """The prompt's embeddings (and the negative prompt's with guidance), and a diffusion
        transformer's T5 embeddings (None for a U-Net model), both encoded at once."""
        family = (await self.denoiser_info(params.model)).family
        encode = EncodeText(request_id, params.prompt, params.negative_prompt,
                            with_uncond(params, family), params.loras,
                            params.max_sequence_length)  # fmt: skip
        t5 = client.encode_t5(encode) if family in DIT_FAMILIES else _none()
        embeddings, t5 = await asyncio.gather(client.encode_text(encode), t5)
        return embeddings, t5

    @staticmethod
    async def _encode_image(
        client: StageClient, params: GenerateParams, request_id: str
    ) -> ImageEncoding | None:
        """The VaeEncoder's encoding of the init image and mask; None for text-to-image."""
        if not params.init_image:
            return None
        request = EncodeImage(request_id, params.init_image, params.mask_image)
        return await client.encode_image(request)

    @staticmethod
    async def _denoise_events(
        client: StageClient, denoise: Denoise, started: float
    ) -> AsyncIterator[Queued | Progress | Preview | Denoised]:
        """The Denoiser's stream as the request's events; the final latents come last."""
        async for event in client.denoise_stream(denoise):
            if isinstance(event, DenoiseQueued):
                yield Queued(position=event.position, request_id=denoise.request_id)
            elif isinstance(event, DenoiseStep):
                yield Progress(event.step, event.total, elapsed_s=time.perf_counter() - started)
                if event.preview_pngs:
                    yield Preview(step=event.step, pngs=event.preview_pngs)
            elif isinstance(event, Denoised):
                yield event


def _control_inputs(params: GenerateParams) -> tuple[ControlInput, ...]:
    """The request's controls, their images preprocessed and resized to its size."""
    return tuple(
        ControlInput(c.name, control_pixels(c.image, params.width, params.height, c.preprocess,
                                            c.canny_low, c.canny_high),
                     c.scale, c.start, c.end, c.guess_mode)
        for c in params.controls
    )  # fmt: skip


async def _nothing() -> tuple:
    return ()


async def _none() -> None:
    return None


async def _timed(awaitable):
    """(its result, seconds it took)."""
    started = time.perf_counter()
    result = await awaitable
    return result, time.perf_counter() - started
