"""Per-row LoRA in one forward: the wrapped layers and the row plan they read.

`rows(model, plan)` sets, for the forwards inside it, which adapters each batch row uses (a list
with one entry per row, each a tuple of (adapter, scale)). The model's LoRA-targeted
nn.Linear / nn.Conv2d layers are wrapped in place, on demand, by a `LoraLayer` that keeps a
reference to the base layer and computes

    y = base(x) + sum over the row's adapters of scale * B(A(x)) * alpha / rank

as S-LoRA and Punica do: for each adapter used in the batch, gather its rows (index_select),
one low-rank matmul (or convolution pair) over them, scatter-add the delta (index_add). The base
weights are never modified, rows without adapters get exactly the base layer's output, and a
forward in which no row has adapters is the base layer call alone.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdserve.pipeline.lora_adapter import LoraAdapter, LoraFactors

RowPlan = Sequence[Sequence[tuple[LoraAdapter, float]]]
"""One entry per batch row: the (adapter, scale) pairs that row uses (empty: none)."""


@dataclass(eq=False)
class _Group:
    """One adapter's rows in the current forward."""

    factors: dict[str, LoraFactors]
    index: torch.Tensor
    """The batch rows that use the adapter, shape (n,)."""
    scales: torch.Tensor
    """Each of those rows' scale, shape (n,)."""
    full: bool
    """Every row of the batch, in order: no gather or scatter needed."""
    _scaled: dict[tuple[float, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def row_scales(self, alpha_over_rank: float, like: torch.Tensor) -> torch.Tensor:
        """scale * alpha / rank per row, shaped to broadcast over `like`'s rows."""
        scaled = self._scaled.get((alpha_over_rank, like.dtype))
        if scaled is None:
            scaled = (self.scales * alpha_over_rank).to(like.dtype)
            self._scaled[alpha_over_rank, like.dtype] = scaled
        return scaled.view(-1, *([1] * (like.dim() - 1)))


class LoraLayer(torch.nn.Module):
    """A LoRA-targeted nn.Linear or nn.Conv2d, wrapped: the base layer's output, plus each
    adapter's delta on the rows that use it. Other attributes (weight, in_features,
    out_channels...) are the base layer's."""

    def __init__(self, base: torch.nn.Linear | torch.nn.Conv2d, name: str, layers: LoraLayers):
        super().__init__()
        self.base = base
        self.module_name = name
        self.layers = layers
        object.__setattr__(self, "_base", base)  # a plain attribute: the fast path's lookup

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or "base" not in modules or name == "base":
                raise
            return getattr(modules["base"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.layers.groups
        if groups is None:
            return self._base(x)
        y = self._base(x)
        if x.shape[0] != self.layers.batch:
            raise RuntimeError(f"LoRA row plan of {self.layers.batch} rows, but "
                               f"{self.module_name} got a batch of {x.shape[0]}")  # fmt: skip
        for group in groups:
            f = group.factors.get(self.module_name)
            if f is None:
                continue
            if group.full:
                y.add_(self._delta(x, f) * group.row_scales(f.scale, y))
            else:
                picked = x.index_select(0, group.index)
                delta = self._delta(picked, f) * group.row_scales(f.scale, picked)
                y.index_add_(0, group.index, delta.to(y.dtype))
        return y

    def _delta(self, x: torch.Tensor, f: LoraFactors) -> torch.Tensor:
        """B(A(x)) for these rows (without the scales)."""
        if isinstance(self.base, torch.nn.Conv2d):
            hidden = F.conv2d(x, f.down, None, self.base.stride, self.base.padding)
            return F.conv2d(hidden, f.up)
        return F.linear(F.linear(x, f.down), f.up)


class LoraLayers:
    """A model's LoRA state: its wrapped layers (by module name) and the current forward's
    row groups. One per model (`of`)."""

    _by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, model: torch.nn.Module):
        self._model = weakref.ref(model)
        self.wrapped: dict[str, LoraLayer] = {}
        self._installed: weakref.WeakSet = weakref.WeakSet()
        self.groups: list[_Group] | None = None
        """The current forward's adapter groups; None: no row has adapters."""
        self.batch = 0

    @classmethod
    def of(cls, model: torch.nn.Module) -> LoraLayers:
        """The model's LoRA state (created on first use)."""
        with cls._lock:
            layers = cls._by_model.get(model)
            if layers is None:
                layers = cls._by_model[model] = cls(model)
            return layers

    def install(self, adapter: LoraAdapter, part: str = "unet") -> None:
        """Wraps, in place, every layer of the model that the adapter's `part` factors target
        and that is not wrapped yet. Idempotent; adapters loaded later wrap more layers."""
        if adapter in self._installed:
            return
        model = self._model()
        for name in adapter.factors(part):
            if name not in self.wrapped:
                try:
                    self.wrap(model, name)
                except ValueError as exc:
                    raise ValueError(
                        f"LoRA {adapter.name!r} does not fit this model: {exc}"
                    ) from exc
        self._installed.add(adapter)

    def wrap(self, model: torch.nn.Module, name: str) -> LoraLayer:
        """Wraps the model's layer `name` (a wrapper already there is adopted)."""
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = getattr(parent, attr)
        except AttributeError as exc:
            raise ValueError(f"it has no module {name}") from exc
        if isinstance(layer, LoraLayer):
            layer.layers = self
        elif isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            layer = LoraLayer(layer, name, self)
            setattr(parent, attr, layer)
        else:
            raise ValueError(f"{name} is a {type(layer).__name__}, not a Linear or Conv2d")
        self.wrapped[name] = layer
        return layer

    def plan_groups(self, plan: RowPlan, part: str) -> list[_Group]:
        """The plan's adapter groups (installing the adapters' layers on demand)."""
        by_adapter: dict[int, tuple[LoraAdapter, list[int], list[float]]] = {}
        for i, entry in enumerate(plan):
            for adapter, scale in entry:
                if scale != 0 and adapter.factors(part):
                    _, index, scales = by_adapter.setdefault(id(adapter), (adapter, [], []))
                    index.append(i)
                    scales.append(float(scale))
        groups = []
        for adapter, index, scales in by_adapter.values():
            self.install(adapter, part)
            device = next(iter(adapter.factors(part).values())).down.device
            groups.append(_Group(
                factors=adapter.factors(part),
                index=torch.tensor(index, dtype=torch.long, device=device),
                scales=torch.tensor(scales, dtype=torch.float32, device=device),
                full=index == list(range(len(plan))),
            ))  # fmt: skip
        return groups


@contextlib.contextmanager
def rows(model: torch.nn.Module, plan: RowPlan, part: str = "unet") -> Iterator[None]:
    """Inside the block, the model's forwards apply each row's adapters (`plan`: one entry per
    batch row, each a tuple of (adapter, scale)); `part` names which of the adapters' factors
    this model takes ("unet", "text_encoder" or "text_encoder_2"). Without any adapter in the
    plan the block changes nothing."""
    layers = LoraLayers.of(model)
    groups = layers.plan_groups(plan, part) or None
    previous = layers.groups, layers.batch
    layers.groups, layers.batch = groups, len(plan)
    try:
        yield
    finally:
        layers.groups, layers.batch = previous


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The base layer of a wrapped layer; any other module as it is."""
    return module.base if isinstance(module, LoraLayer) else module
