"""LoRA per request: different adapters mixed in ONE U-Net forward, each row with its own.

The reference for one request is diffusers' own `load_lora_weights` + `set_adapters` (PEFT);
the mechanism under test applies each row's adapters in a shared forward (`lora.rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import diffusers_image

from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.engine import DenoiseEngine, Finished
from sdserve.pipeline.lora import (
    LoraAdapter,
    LoraCache,
    LoraFactors,
    LoraLayers,
    hold_while_alive,
    load_lora,
    rows,
)
from sdserve.pipeline.lora_layers import base_layer
from sdserve.pipeline.text import TextEncoder
from sdserve.pipeline.vae import VaeDecoder
from sdserve.testing.loras import write_random_lora

PROMPT, STEPS, SCHEDULER, SIZE = "a red circle", 6, "euler_ancestral", 64
A_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")  # + 1x1 convs
B_TARGETS = ("to_q", "to_v", "to_out.0", "ff.net.2", "time_emb_proj", "conv1", "conv_shortcut")


@dataclass(frozen=True)
class Request:
    name: str
    loras: tuple[tuple[str, float], ...]
    seed: int
    guidance: float = 7.5


REQUESTS = (
    Request("none", (), 10),
    Request("A 0.8", (("A", 0.8),), 11),
    Request("B 1.0", (("B", 1.0),), 12, guidance=1.0),  # no unconditional row
    Request("A 0.5 + B 1.2", (("A", 0.5), ("B", 1.2)), 13),
)


class World:
    """The stages, the adapter files (A: diffusers format with text-encoder factors; B: kohya
    format with LoCon convolutions), what the base model made before any adapter existed."""

    def __init__(self, model_dir: Path, tmp: Path):
        self.model_dir = model_dir
        f32 = "float32"  # compared with diffusers/PEFT in float32
        self.text, self.denoiser = TextEncoder(model_dir, dtype=f32), Denoiser(model_dir, dtype=f32)
        self.vae = VaeDecoder(model_dir, dtype=f32)
        self.params = self.weights()
        self.before = self.solo(REQUESTS[0])
        self.before_emb = self.text.encode(PROMPT, "", True)
        unet = self.denoiser.unet
        self.files = {
            "A": write_random_lora(unet, tmp / "pytorch_lora_weights.safetensors", seed=1,
                                   targets=A_TARGETS, text_encoder=self.text.model, alpha=2),
            "B": write_random_lora(unet, tmp / "b_kohya.safetensors", seed=2, targets=B_TARGETS,
                                   kohya=True, alpha=2),
        }  # fmt: skip
        self.adapters = {
            name: load_lora(path, name, unet, self.text.model) for name, path in self.files.items()
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """Every parameter of the U-Net and the text encoder, by its unwrapped name."""
        return {f"{part}.{name.replace('.base.', '.')}": p.detach().clone()
                for part, model in (("unet", self.denoiser.unet), ("text", self.text.model))
                for name, p in model.named_parameters()}  # fmt: skip

    def loras(self, request: Request) -> tuple[tuple[LoraAdapter, float], ...]:
        return tuple((self.adapters[name], scale) for name, scale in request.loras)

    def job_args(self, request: Request) -> tuple[tuple, dict]:
        loras = self.loras(request)
        emb = self.text.encode(PROMPT, "", request.guidance > 1, loras=loras)
        kwargs = dict(width=SIZE, height=SIZE, steps=STEPS, guidance_scale=request.guidance,
                      scheduler=SCHEDULER, seeds=[request.seed], loras=loras)  # fmt: skip
        return (emb.cond, emb.uncond), kwargs

    def solo(self, request: Request, denoiser: Denoiser | None = None, **kwargs) -> torch.Tensor:
        args, job_kwargs = self.job_args(request)
        return (denoiser or self.denoiser).denoise(*args, **job_kwargs | kwargs)

    def image(self, latents: torch.Tensor) -> np.ndarray:
        return self.vae.decode(latents)[0].astype(int)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory) -> World:
    return World(tiny_model, tmp_path_factory.mktemp("loras"))


def _run_engine(engine: DenoiseEngine) -> None:
    for _ in range(1000):
        if engine.step() is None and engine.counts() == (0, 0):
            return
    raise AssertionError("engine did not drain")


def _engine_batch(world: World, requests, **kwargs) -> tuple[dict, list[int]]:
    """All requests submitted together to one engine: ({name: final latents}, the row count of
    every U-Net forward, full or DeepCache's shallow one)."""
    forwards: list[int] = []
    handle = world.denoiser.unet.conv_in.register_forward_pre_hook(
        lambda module, args: forwards.append(args[0].shape[0])
    )
    engine = DenoiseEngine(world.denoiser.unet, max_batch_size=16)
    results = {}
    try:
        for request in requests:
            args, job_kwargs = world.job_args(request)

            def on_event(event, name=request.name):
                if isinstance(event, Finished):
                    results[name] = event.latents

            engine.submit(world.denoiser.make_job(request.name, *args, on_event=on_event,
                                                  **job_kwargs | kwargs))  # fmt: skip
        _run_engine(engine)
    finally:
        handle.remove()
    return results, forwards


@pytest.fixture(scope="module")
def batch(world) -> dict[str, np.ndarray]:
    """The four requests in one engine batch; every forward covers all of their rows."""
    latents, forwards = _engine_batch(world, REQUESTS)
    rows_per_forward = sum(1 + (r.guidance > 1) for r in REQUESTS)
    assert forwards == [rows_per_forward] * STEPS  # they really shared every forward
    return {name: world.image(lat) for name, lat in latents.items()}


@pytest.fixture(scope="module")
def lora_pipe(world):
    """diffusers' pipeline with both files loaded as named adapters (the oracle)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world.model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name, path in world.files.items():
        pipe.load_lora_weights(str(path), adapter_name=f"adapter_{name}")
    return pipe


def _diffusers(world: World, pipe, request: Request) -> np.ndarray:
    if request.loras:
        pipe.enable_lora()
        pipe.set_adapters([f"adapter_{n}" for n, _ in request.loras],
                          adapter_weights=[s for _, s in request.loras])  # fmt: skip
    else:
        pipe.disable_lora()
    return diffusers_image(pipe, world.model_dir, SCHEDULER, prompt=PROMPT, steps=STEPS,
                           guidance=request.guidance, width=SIZE, height=SIZE,
                           seed=request.seed).astype(int)  # fmt: skip


def test_one_batch_of_mixed_adapters_matches_solo_runs_and_diffusers(world, batch, lora_pipe):
    for request in REQUESTS:
        solo = world.image(world.solo(request))
        theirs = _diffusers(world, lora_pipe, request)
        print(f"{request.name}: batch vs solo {_diff(batch[request.name], solo)}, "
              f"batch vs diffusers {_diff(batch[request.name], theirs)}")  # fmt: skip
        assert _diff(batch[request.name], solo) <= 2, request
        assert _diff(batch[request.name], theirs) <= 2, request


def test_request_without_adapters_is_bit_identical_to_before_any_adapter(world, batch):
    assert LoraLayers.of(world.denoiser.unet).wrapped  # the U-Net's layers are wrapped now
    assert LoraLayers.of(world.text.model).wrapped  # and the text encoder's
    emb = world.text.encode(PROMPT, "", True)
    assert torch.equal(emb.cond, world.before_emb.cond)
    assert torch.equal(emb.uncond, world.before_emb.uncond)
    assert torch.equal(world.solo(REQUESTS[0]), world.before)
    after = world.weights()
    assert after.keys() == world.params.keys()
    assert all(torch.equal(after[k], v) for k, v in world.params.items())  # base weights


def test_adapters_change_the_image(world, batch):
    for name in ("A 0.8", "B 1.0", "A 0.5 + B 1.2"):
        print(f"{name} vs none: {_diff(batch[name], batch['none'])}")
        assert _diff(batch[name], batch["none"]) > 10, name
    assert _diff(batch["A 0.5 + B 1.2"], batch["A 0.8"]) > 10
    with_a = world.text.encode(PROMPT, "", True, loras=world.loras(REQUESTS[1]))
    assert (with_a.cond - world.before_emb.cond).abs().max() > 0.1  # its text-encoder factors


def test_rows_without_adapters_get_exactly_the_base_output(world):
    """In one forward of four rows (none, A, none, B 0.5), rows 0 and 2 are bit-identical to
    the base forward's, rows 1 and 3 to forwards where every row uses their adapter."""
    unet, (a, b) = world.denoiser.unet, (world.adapters["A"], world.adapters["B"])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([999.0, 500.0, 250.0, 1.0])
    context = torch.randn(4, 77, 32, generator=generator)

    def forward(plan):
        with rows(unet, plan), torch.inference_mode():
            return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    base = forward([()] * 4)
    mixed = forward([(), ((a, 1.0),), (), ((b, 0.5),)])
    only_a, only_b = forward([((a, 1.0),)] * 4), forward([((b, 0.5),)] * 4)
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
    torch.testing.assert_close(mixed[1], only_a[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[3], only_b[3], rtol=1e-5, atol=1e-5)
    assert (mixed[1] - base[1]).abs().max() > 1e-2 and (mixed[3] - base[3]).abs().max() > 1e-2


def _merged_denoiser(world: World, adapter: LoraAdapter, scale: float) -> Denoiser:
    """A fresh U-Net with the adapter merged into its weights: W + scale * alpha/r * B A."""
    denoiser = Denoiser(world.model_dir, dtype="float32")
    with torch.no_grad():
        for name, f in adapter.unet.items():
            layer = base_layer(denoiser.unet.get_submodule(name))
            if f.down.dim() == 4:
                delta = torch.einsum("or,rihw->oihw", f.up[:, :, 0, 0], f.down)
            else:
                delta = f.up @ f.down
            layer.weight += scale * f.scale * delta
    return denoiser


def test_deepcache_shallow_steps_apply_each_rows_adapters(world):
    """With DeepCache (cache_interval 2), the shallow forwards too: B's request in a batch
    with a request without adapters equals B merged into the U-Net's weights."""
    requests = (Request("B deep", (("B", 1.0),), 21), Request("none deep", (), 22))
    latents, forwards = _engine_batch(world, requests, cache_interval=2)
    assert forwards == [4] * STEPS  # both requests, guided, in every (full or shallow) forward
    merged = _merged_denoiser(world, world.adapters["B"], 1.0)
    reference = world.solo(Request("B deep", (), 21), merged, cache_interval=2)
    diff = _diff(world.image(latents["B deep"]), world.image(reference))
    print(f"DeepCache: B in a batch vs B merged into the weights: {diff}")
    assert diff <= 2
    alone = world.solo(requests[1], cache_interval=2)
    assert _diff(world.image(latents["none deep"]), world.image(alone)) <= 2
    no_lora = world.solo(Request("B deep", (), 21), cache_interval=2)
    assert _diff(world.image(latents["B deep"]), world.image(no_lora)) > 10


def test_both_formats_of_the_same_factors_load_the_same(world, tmp_path):
    """kohya keys (attention, ff, LoCon convolutions; the text encoder's q/k/v/out and mlp)
    map to the same modules, factors and alpha / rank as diffusers' keys."""
    unet, text_model = world.denoiser.unet, world.text.model
    kwargs = dict(
        seed=5,
        targets=B_TARGETS + ("proj_in",),
        text_encoder=text_model,
        text_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1"),
        alpha=3,
    )
    paths = [write_random_lora(unet, tmp_path / f"{kohya}.safetensors", kohya=kohya, **kwargs)
             for kohya in (False, True)]  # fmt: skip
    ours, kohyas = (load_lora(p, p.stem, unet, text_model) for p in paths)
    for part in ("unet", "text_encoder"):
        assert ours.factors(part).keys() == kohyas.factors(part).keys() != set()
        for name, f in ours.factors(part).items():
            g = kohyas.factors(part)[name]
            assert torch.equal(f.down, g.down) and torch.equal(f.up, g.up), name
            assert f.scale == g.scale == 3 / 4, name


def _bad_files(unet_attn: str) -> dict[str, tuple[dict, str]]:
    """name: (tensors, a fragment the error must name)."""
    q = f"{unet_attn}.to_q"
    kohya = "lora_unet_" + unet_attn.replace(".", "_")
    return {
        "unknown module": ({f"unet.{unet_attn}.to_z.lora_A.weight": torch.zeros(4, 32),
                            f"unet.{unet_attn}.to_z.lora_B.weight": torch.zeros(32, 4)}, "to_z"),
        "unknown kohya module": ({f"{kohya}_to_z.lora_down.weight": torch.zeros(4, 32),
                                  f"{kohya}_to_z.lora_up.weight": torch.zeros(32, 4),
                                  f"{kohya}_to_z.alpha": torch.tensor(4.0)}, "attn1.to.z"),
        "wrong shape": ({f"unet.{q}.lora_A.weight": torch.zeros(4, 31),
                         f"unet.{q}.lora_B.weight": torch.zeros(32, 4)}, "to_q"),
        "wrong rank": ({f"unet.{q}.lora_A.weight": torch.zeros(4, 32),
                        f"unet.{q}.lora_B.weight": torch.zeros(32, 3)}, "to_q"),
        "wrong conv kernel": ({"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 1, 1),
                               "unet.conv_in.lora_B.weight": torch.zeros(32, 4, 1, 1)}, "conv_in"),
        "half missing": ({f"unet.{q}.lora_A.weight": torch.zeros(4, 32)}, "to_q"),
        "not a LoRA key": ({"unet.conv_in.weight": torch.zeros(32, 4, 3, 3)}, "conv_in.weight"),
        "no part": ({f"vae.{q}.lora_A.weight": torch.zeros(4, 32)}, "vae."),
        "empty": ({}, "no LoRA weights"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_files("x")))
def test_bad_files_raise_value_error_naming_the_file(world, tmp_path, case):
    from safetensors.torch import save_file

    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors, fragment = _bad_files(attn)[case]
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="bad.safetensors") as error:
        load_lora(path, "bad", world.denoiser.unet, world.text.model)
    assert fragment in str(error.value)


def test_a_file_that_is_not_safetensors_raises_value_error(world, tmp_path):
    path = tmp_path / "pickle.safetensors"
    path.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ValueError, match="pickle.safetensors"):
        load_lora(path, "x", world.denoiser.unet)


def test_an_adapter_for_another_model_fails_its_own_request(world):
    factors = LoraFactors(torch.zeros(4, 32), torch.zeros(32, 4), 1.0)
    stranger = LoraAdapter("stranger", unet={"down_blocks.7.attn.to_q": factors})
    args, kwargs = world.job_args(REQUESTS[0])
    with pytest.raises(ValueError, match="stranger"):
        world.denoiser.make_job("r", *args, **kwargs | {"loras": ((stranger, 1.0),)})


def _adapter(name: str, nbytes: int) -> LoraAdapter:
    factors = LoraFactors(torch.zeros(nbytes // 8), torch.zeros(nbytes // 8), 1.0)
    return LoraAdapter(name, unet={"m": factors})


class _Request:
    """Stands for a request's `DenoiseJob`: what holds its adapters while it lives."""


def test_lora_cache_evicts_least_recently_used_within_its_bound():
    cache, loads = LoraCache(max_bytes=2500), []

    def get(name, nbytes=1000):
        return cache.get(name, lambda: loads.append(name) or _adapter(name, nbytes))

    get("a"), get("b"), get("a")
    assert loads == ["a", "b"] and cache.names() == ["b", "a"]  # a hit: no load, now recent
    get("c")  # 3000 bytes: the least recently used (b) goes
    assert cache.names() == ["a", "c"] and cache.nbytes == 2000
    request_a, request_c = _Request(), _Request()  # running requests using a and c
    hold_while_alive(request_a, [(get("a"), 1.0)])
    hold_while_alive(request_c, [(get("c"), 1.0)])
    get("d")
    assert cache.names() == ["a", "c", "d"]  # over the bound, but nothing else to evict
    del request_a  # the request has left: a is free, evicted at the next load
    get("e", nbytes=8)
    assert cache.names() == ["c", "d", "e"]
    get("a")  # c is still held: d goes
    assert loads == ["a", "b", "c", "d", "e", "a"] and cache.names() == ["c", "e", "a"]
    del request_c
    assert cache.names() == ["c", "e", "a"]  # within the bound: nothing to evict
    with pytest.raises(ValueError, match="big"):
        get("big", nbytes=4000)
    assert "big" not in cache and len(cache) == 3


def test_an_adapter_in_use_by_a_request_is_not_evicted(world):
    """While a request's rows use an adapter (queued or running in the engine), loading others
    past the cache's bound does not evict it: a request naming it meanwhile gets the same copy
    instead of loading a second one. Once the request has left, it can go."""
    adapter, loads = world.adapters["A"], []
    cache = LoraCache(max_bytes=adapter.nbytes)  # room for A alone
    cache.get("A", lambda: loads.append("A") or adapter)
    args, kwargs = world.job_args(REQUESTS[1])  # "A 0.8"
    engine = DenoiseEngine(world.denoiser.unet, max_batch_size=16)
    engine.submit(world.denoiser.make_job("r", *args, **kwargs))
    engine.step()  # admitted: its rows run with A
    cache.get("other", lambda: _adapter("other", 8))  # over the bound
    assert cache.get("A", lambda: loads.append("A again") or adapter) is adapter
    assert loads == ["A"]
    _run_engine(engine)  # the request has finished and left
    cache.get("third", lambda: _adapter("third", 8))
    assert "A" not in cache


def test_a_request_naming_two_adapters_keeps_the_first_while_loading_the_second(tmp_path):
    """Resolving a request's adapters holds each one as it is loaded: with room for one, the
    second's load does not evict the first, so the next request naming the first gets it from
    the cache instead of a second load."""
    from sdserve.stages.loras import Adapters

    for name in ("first", "second"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    loads = []

    def load(path, name):
        loads.append(name)
        return _adapter(name, 1000)

    adapters = Adapters(tmp_path, max_bytes=1500, load=load)
    applied = adapters.resolve((("first", 1.0), ("second", 0.5)))
    assert [a.name for a, _ in applied] == ["first", "second"]
    assert adapters.cache.names() == ["first", "second"]  # over the bound while both were held
    hold_while_alive(job := _Request(), applied)  # the request's job holds them from here
    adapters.resolve((("first", 1.0),))
    assert loads == ["first", "second"]
    del job
