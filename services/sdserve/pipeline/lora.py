"""LoRA adapters per request: loading them, and a bounded cache of loaded ones.

An adapter is a set of low-rank factors (A "down", B "up", and alpha / rank) per targeted
module of the U-Net and, optionally, of the text encoder(s). `load_lora` reads the files users
have: diffusers/PEFT `.safetensors` (`pytorch_lora_weights.safetensors` as `save_lora_weights`
writes it) and kohya-style `.safetensors` (`lora_unet_..._lora_down` / `lora_up` / `alpha`),
through diffusers' own converter (`StableDiffusionPipeline.lora_state_dict`), and maps its keys
to our modules, checking every shape. Linear layers and Conv2d layers (LoCon: a 1x1 or k x k
down convolution and a 1x1 up convolution) are supported.

Applying adapters per batch row is `lora_layers.rows`: the weights of the model are never
modified, so any mix of adapters shares one forward.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from sdserve.pipeline import held_cache
from sdserve.pipeline.held_cache import HeldCache, in_use
from sdserve.pipeline.lora_adapter import PARTS, LoraAdapter, LoraFactors
from sdserve.pipeline.lora_layers import LoraLayer, LoraLayers, RowPlan, base_layer, rows

__all__ = ["LoraAdapter", "LoraCache", "LoraFactors", "LoraLayer", "LoraLayers", "RowPlan",
           "hold_while_alive", "in_use", "load_lora", "rows"]  # fmt: skip

logger = logging.getLogger(__name__)


def load_lora(path: str | Path, name: str, unet=None, text_encoder=None, *,
              text_encoder_2=None) -> LoraAdapter:  # fmt: skip
    """Reads a LoRA `.safetensors` file (diffusers/PEFT or kohya format) for these models.

    Factors are kept in each model's device and dtype. A part whose model is not given (None)
    is skipped: the Denoiser loads the U-Net's factors, the text encoder stage its own.

    Raises:
        ValueError: naming the file: it is not a safetensors file, has no LoRA weights, has a
            key that names no Linear or Conv2d module of the model (the first such key), lacks
            a key's other half, or has factors whose shapes do not fit the module.
    """
    path = Path(path)
    raw, metadata = _read_safetensors(path)
    state_dict, alphas = _to_diffusers_layout(path, raw, unet)
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        part, _, rest = key.partition(".")
        if part not in PARTS or not rest:
            raise ValueError(f"{path}: cannot map LoRA key {key!r} to a model part {PARTS}")
        by_part.setdefault(part, {})[rest] = tensor
    if not by_part:
        raise ValueError(f"{path}: no LoRA weights in the file")
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    adapter = LoraAdapter(name, path=str(path))
    for part, keys in by_part.items():
        if models[part] is not None:
            config = _prefixed(metadata, part)
            part_alphas = _prefixed(alphas or {}, part)
            factors = _part_factors(path, part, models[part], keys, part_alphas, config)
            setattr(adapter, part, factors)
    logger.info("loaded LoRA %s from %s: %s", name, path, adapter)
    return adapter


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors (never unpickled) and diffusers' LoRA adapter metadata ({} if none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
            header = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path}: not a readable .safetensors LoRA file: {exc}") from exc
    try:
        metadata = json.loads(header.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: unreadable lora_adapter_metadata: {exc}") from exc
    return tensors, metadata


def _to_diffusers_layout(path: Path, raw: dict, unet) -> tuple[dict, dict | None]:
    """diffusers' converter: (state dict with `unet.` / `text_encoder.` keys, kohya alphas)."""
    from diffusers import StableDiffusionPipeline

    config = unet.config if unet is not None else None
    try:
        return StableDiffusionPipeline.lora_state_dict(raw, unet_config=config)
    except Exception as exc:  # the file's contents are the user's: any failure is its fault
        raise ValueError(f"{path}: not a LoRA file diffusers can read: {exc!r}") from exc


def _prefixed(mapping: dict, part: str) -> dict:
    return {k[len(part) + 1 :]: v for k, v in mapping.items() if k.startswith(part + ".")}


_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
)
_OLD_ATTENTION = re.compile(r"(.*)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_OLD_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


def _module_and_role(key: str, part: str, model) -> tuple[str, str] | None:
    """(module name, "down" or "up") of a diffusers-layout key (PEFT's `lora_A`/`lora_B`, or
    the older `lora.down`, `lora_linear_layer.down`, `processor.to_q_lora.down`), or None."""
    key = key.replace(".processor.", ".")
    module = role = None
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            module, role = key[: -len(suffix)], kind
            break
    else:
        match = _OLD_ATTENTION.fullmatch(key)
        if match is None:
            return None
        names = _OLD_NAMES["unet" if part == "unet" else "text"]
        module, role = f"{match[1]}.{names[match[2]]}", match[3]
    if part != "unet" and not hasattr(model, "text_model"):
        module = module.removeprefix("text_model.")  # CLIPTextModel is flat in transformers 5
    return module, role


def _part_factors(path: Path, part: str, model, keys: dict, alphas: dict,
                  config: dict) -> dict[str, LoraFactors]:  # fmt: skip
    """One part's factors, checked against its model's modules."""
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in keys.items():
        mapped = _module_and_role(key, part, model)
        if mapped is None:
            raise ValueError(f"{path}: cannot map LoRA key {part + '.' + key!r} to a module")
        halves.setdefault(mapped[0], {})[mapped[1]] = (f"{part}.{key}", tensor)
    modules = dict(model.named_modules())
    alpha_of = _alpha_rule(part, model, alphas, config)
    factors = {}
    for module, pair in halves.items():
        key = next(iter(pair.values()))[0]
        layer = base_layer(modules.get(module, torch.nn.Identity()))
        if not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            raise ValueError(f"{path}: LoRA key {key!r}: the {part} has no Linear or Conv2d "
                             f"module {module!r}")  # fmt: skip
        if set(pair) != {"down", "up"}:
            raise ValueError(f"{path}: LoRA key {key!r} has no {'up' if 'down' in pair else 'down'}"
                             " half")  # fmt: skip
        down, up = _fit(path, key, layer, pair["down"][1], pair["up"][1])
        rank = down.shape[0]
        divisor = math.sqrt(rank) if config.get("use_rslora") else rank
        weight = layer.weight
        factors[module] = LoraFactors(
            down=down.to(weight.device, weight.dtype),
            up=up.to(weight.device, weight.dtype),
            scale=float(alpha_of(module, rank)) / divisor,
        )
    return factors


def _fit(path: Path, key: str, layer, down: torch.Tensor, up: torch.Tensor):
    """The factors in the layer's layout (a 1x1 Linear/Conv2d difference is reshaped), or a
    ValueError naming the shapes."""
    out_dim, in_dim = layer.weight.shape[:2]
    rank = down.shape[0] if down.dim() else 0
    if isinstance(layer, torch.nn.Conv2d):
        if layer.groups != 1 or tuple(layer.dilation) != (1, 1) or layer.padding_mode != "zeros":
            raise ValueError(f"{path}: LoRA key {key!r}: grouped, dilated or padded-by-"
                             f"{layer.padding_mode} convolutions are not supported")  # fmt: skip
        kernel = tuple(layer.kernel_size)
        if down.dim() == 2 and kernel == (1, 1):
            down = down[:, :, None, None]
        if up.dim() == 2:
            up = up[:, :, None, None]
        want_down, want_up = (rank, in_dim, *kernel), (out_dim, rank, 1, 1)
    else:
        if down.dim() == 4 and down.shape[2:] == (1, 1):
            down = down[:, :, 0, 0]
        if up.dim() == 4 and up.shape[2:] == (1, 1):
            up = up[:, :, 0, 0]
        want_down, want_up = (rank, in_dim), (out_dim, rank)
    if rank == 0 or tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise ValueError(f"{path}: LoRA key {key!r}: shapes down {tuple(down.shape)}, up "
                         f"{tuple(up.shape)} do not fit {layer} (want {want_down}, "
                         f"{want_up})")  # fmt: skip
    return down, up


def _alpha_rule(part: str, model, alphas: dict, config: dict) -> Callable[[str, int], float]:
    """alpha(module, rank) as diffusers reads it: the file's PEFT config (`lora_alpha`,
    `alpha_pattern`) when it has one, else kohya's per-module alphas, else alpha = rank."""
    if config:
        default = config.get("lora_alpha", 8)  # what LoraConfig(**config) defaults to
        patterns = config.get("alpha_pattern") or {}

        def from_config(module: str, rank: int) -> float:
            for pattern, alpha in patterns.items():  # PEFT's get_pattern_key
                if re.match(rf"(.*\.)?({pattern})$", module):
                    return alpha
            return default

        return from_config
    by_module = {}
    for key, alpha in alphas.items():
        name = key.removesuffix(".alpha")
        if not name.endswith("down.weight"):
            name = name + ".lora.down.weight"
        mapped = _module_and_role(name, part, model)
        if mapped is not None:
            by_module[mapped[0]] = alpha
    return lambda module, rank: by_module.get(module, rank)


def hold_while_alive(owner: object, loras: Iterable[tuple[LoraAdapter, float]]) -> None:
    """Marks a request's adapters in use for as long as `owner` (its `DenoiseJob`) exists: the
    cache evicts none of them (`held_cache.hold_while_alive`)."""
    held_cache.hold_while_alive(owner, [adapter for adapter, _ in loras])


class LoraCache(HeldCache[LoraAdapter]):
    """Loaded adapters by name, least recently used first out, within `max_bytes`; an adapter
    a live request holds (`hold_while_alive`) is never evicted (`held_cache.HeldCache`)."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes, lambda adapter: adapter.nbytes, "LoRA")
