"""LoRA on the tensor-parallel linears: y = W x + (alpha / r) * B A x, W frozen, only A and B trained.

Shapes and sharding (W as in core.tensor_parallel.layers; A (r, in), B (out, r) globally):
    column-parallel  W (out/tp, in)   A (r, in) replicated     B (out/tp, r) split like W    tp_dim: A None, B 0
    row-parallel     W (out, in/tp)   A (r, in/tp) split like W B (out, r) replicated        tp_dim: A 1, B None
so B_local @ A_local is this rank's shard of B A in both cases: merging (W += s B A) needs no communication.

Gradients of the replicated factor: a column-parallel rank uses A for its own output shard only, and a
row-parallel rank feeds B its partial product A_r x_r (see LoraRowParallelLinear), so on each rank the
replicated factor's gradient is a partial sum. The forward reads it through copy_to_tp (identity forward,
all-reduce of the gradient over tp in backward), as RMSNorm(partial_over=tp) does: the gradient reaching
the parameter (and DDP's main_grad) is the full one on every tp rank, with or without sequence parallelism.

Initialisation follows PEFT: A kaiming-uniform (a = sqrt(5)), drawn FULL from a generator seeded by
(seed, the layer's global name) and sharded like the layer's weight, so every layout (tp, pp split, vpp)
gets the same adapters; B zero, so an adapted model starts equal to its base.

Dropout (cfg.dropout > 0, training only) uses torch's default generator; at tp > 1 its masks are not the
tp = 1 ones (parity tests keep it 0), but the gradient is always that of the forward that ran.

Views of the same weights: `adapters_disabled(chunks)` serves the base model (a DPO/GRPO reference) with no
second copy; `merged_weights(chunks)` folds s B A into W for a refit or export and restores W exactly.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.parallel.collectives import (
    all_gather_along_dim,
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence,
    scatter_to_tp,
)
from core.tensor_parallel.fp8 import fp8_linear
from core.tensor_parallel.init import init_sharded_
from core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

if TYPE_CHECKING:  # only read here: keeps the parallel core importable without pydantic
    from core.config import LoraConfig

ADAPTER_PARAMS = ("lora_A", "lora_B")
_LORA_ATTRS = (*ADAPTER_PARAMS, "lora_dropout", "rank", "alpha", "scaling", "adapters_enabled", "merged")
# LoraConfig.targets -> the attribute name of the adapted linear in attention.py / mlp.py.
TARGET_MODULES = {"qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1", "fc2": "linear_fc2"}


def is_adapter_name(name: str) -> bool:
    """True for a parameter name of an adapter factor (…linear_qkv.lora_A)."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def _kaiming_uniform(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)  # PEFT's init of lora_A


def _adopt(cls: type[nn.Module], source: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """A `cls` module holding `source`'s configuration attributes, submodules and its very parameters, less
    the names in `skip` (no weight is allocated or drawn, so optimizers and views of them stay valid)."""
    if source._buffers:
        raise ValueError(f"cannot re-type a {type(source).__name__} that has buffers")
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.train(source.training)
    for key, value in vars(source).items():
        if not key.startswith("_") and key != "training" and key not in skip:
            setattr(layer, key, value)
    for name, param in source._parameters.items():
        if name not in skip:
            layer.register_parameter(name, param)
    for name, module in source._modules.items():
        if name not in skip:
            layer.add_module(name, module)
    return layer


class LoraLayer(nn.Module):
    """What both adapted linears share: the factors, their scale and the merged / enabled state."""

    weight: nn.Parameter
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    tp_group: dist.ProcessGroup | None
    fp8: bool

    def _init_lora(
        self,
        rank: int,
        alpha: float,
        dropout: float,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        tp_dims: tuple[int | None, int | None],
        generator: torch.Generator,
    ) -> None:
        """a_shape/b_shape: local shapes; tp_dims: the sharded dim of A and of B (None: replicated)."""
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **like))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **like))
        self.lora_A.tp_dim, self.lora_B.tp_dim = tp_dims
        full_a = (rank, self.in_features)
        init_sharded_(self.lora_A, full_a, tp_dims[0], self.tp_group, _kaiming_uniform, generator)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_enabled = True
        self.merged = False

    @property
    def adapter_active(self) -> bool:
        return self.adapters_enabled and not self.merged

    def _linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return (fp8_linear if self.fp8 else F.linear)(x, weight, bias)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A for this rank's shard of W, in fp32 (same shape as self.weight)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge_(self) -> None:
        """W += (alpha / r) B A (one rounding to W's dtype); the adapter path is then skipped."""
        if self.merged:
            raise RuntimeError("adapters are already merged (merged_weights is active)")
        self.weight.copy_(self.weight.float() + self.delta_weight())
        self.merged = True


class LoraColumnParallelLinear(ColumnParallelLinear, LoraLayer):
    """ColumnParallelLinear + s B_local (A x): A (r, in) replicated, B (out/tp, r) split like W."""

    @classmethod
    def from_base(
        cls, base: ColumnParallelLinear, rank: int, alpha: float, dropout: float, generator: torch.Generator
    ) -> LoraColumnParallelLinear:
        layer = _adopt(cls, base)
        out_local = base.weight.shape[0]
        layer._init_lora(
            rank, alpha, dropout, (rank, base.in_features), (out_local, rank), (None, 0), generator
        )
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence(x, self.tp_group)  # (B, T / tp, in) -> (B, T, in)
        else:
            x = copy_to_tp(x, self.tp_group)  # (..., in), gradient all-reduced over tp
        y = self._linear(x, self.weight, self.bias)  # (..., out / tp)
        if self.adapter_active:
            a = copy_to_tp(self.lora_A, self.tp_group)  # replicated: its gradient is summed over tp
            h = F.linear(self.lora_dropout(x), a)  # (..., r), the same on every tp rank
            y = y + self.scaling * F.linear(h, self.lora_B)  # (..., out / tp)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y


class LoraRowParallelLinear(RowParallelLinear, LoraLayer):
    """RowParallelLinear + s B (A_r x_r) joined to the layer's reduction: A (r, in/tp) split like W, B (out, r)
    replicated.

    Each rank adds B (A_r x_r) to its partial output BEFORE the all-reduce (reduce-scatter under sequence
    parallelism). That is exact: B is linear, so sum_r B (A_r x_r) = B (sum_r A_r x_r) = B A x, and it needs
    no collective of its own (the alternative, all-reducing the (..., r) partials A_r x_r first, costs one
    more collective per layer but saves the (..., r) x (r, out) product on the other tp ranks). B's gradient
    on each rank is then dY^T (A_r x_r), a partial sum: B is read through copy_to_tp so that backward sums it.
    """

    @classmethod
    def from_base(
        cls, base: RowParallelLinear, rank: int, alpha: float, dropout: float, generator: torch.Generator
    ) -> LoraRowParallelLinear:
        layer = _adopt(cls, base)
        in_local = base.weight.shape[1]
        layer._init_lora(
            rank, alpha, dropout, (rank, in_local), (base.out_features, rank), (1, None), generator
        )
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group)  # (..., in) -> (..., in / tp)
        y = self._linear(x, self.weight)  # (B, T, out), a partial sum over this rank's input features
        if self.adapter_active:
            h = F.linear(self.lora_dropout(x), self.lora_A)  # (B, T, r), partial over tp
            b = copy_to_tp(self.lora_B, self.tp_group)  # replicated: its gradient is summed over tp
            y = y + self.scaling * F.linear(h, b)  # joins the reduction below (class docstring)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(y, self.tp_group)  # (B, T / tp, out)
        else:
            y = reduce_from_tp(y, self.tp_group)  # (..., out)
        return y if self.bias is None else y + self.bias


# ---- applying, merging, disabling --------------------------------------------------------------------


def _adapter_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator that depends on the seed and the layer's global name only (not on the layout)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def apply_lora(model_chunk: nn.Module, cfg: LoraConfig, seed: int = 0) -> list[str]:
    """Replace the targeted Column/RowParallelLinear layers of a model chunk by their LoRA versions (same
    parameter objects and names, plus `<layer>.lora_A` and `<layer>.lora_B`) and freeze every other
    parameter of the chunk. Module names must be global (GPTModel's are) for layout-invariant init.
    Returns the adapted layers' names. Call it after the base weights are loaded."""
    wanted = {TARGET_MODULES[t] for t in cfg.targets}
    adapted, found = [], set()
    for name, module in list(model_chunk.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf not in wanted or isinstance(module, LoraLayer):
            continue
        if isinstance(module, ColumnParallelLinear):
            cls = LoraColumnParallelLinear
        elif isinstance(module, RowParallelLinear):
            cls = LoraRowParallelLinear
        else:
            continue
        new = cls.from_base(module, cfg.rank, cfg.alpha, cfg.dropout, _adapter_generator(seed, name))
        _set_submodule(model_chunk, name, new)
        adapted.append(name)
        found.add(leaf)
    if missing := [t for t in cfg.targets if TARGET_MODULES[t] not in found]:
        raise ValueError(
            f"lora targets {missing} match no tensor-parallel linear of the model (MoE experts take no adapters)"
        )
    for name, p in model_chunk.named_parameters():
        p.requires_grad_(is_adapter_name(name))
    return adapted


def lora_layers(chunks: nn.Module | Sequence[nn.Module]) -> list[LoraLayer]:
    chunks = [chunks] if isinstance(chunks, nn.Module) else chunks
    return [m for c in chunks for m in c.modules() if isinstance(m, LoraLayer)]


@contextmanager
def adapters_disabled(chunks: nn.Module | Sequence[nn.Module]) -> Iterator[None]:
    """Inside, the chunks compute the base model (adapters skipped): the reference policy of DPO / GRPO from
    the same weights. Not inside merged_weights (the base W is not held then)."""
    layers = lora_layers(chunks)
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters_disabled inside merged_weights: the base weights are not available")
    before = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer.adapters_enabled = enabled


@contextmanager
def merged_weights(chunks: nn.Module | Sequence[nn.Module]) -> Iterator[None]:
    """Inside, the chunks are plain models: every adapted W holds W + (alpha / r) B A and the adapter
    parameters are hidden from named_parameters(), so refit / export code that reads the chunks' parameters
    (core.bridge, rollout.refit) sees merged base-model weights under their usual names. On exit W is
    restored bit for bit from a copy (W + d - d is not exact in floating point): that copy, one adapted
    weight per layer, is the memory cost; LoRA training holds no gradients or optimizer state for W, so
    it fits where full fine-tuning's would. Consume generators (a refit stream) inside the block. No training
    step inside: the optimizer still holds the hidden adapters."""
    merged: list[tuple[LoraLayer, torch.Tensor, dict[str, nn.Parameter]]] = []
    try:
        for layer in lora_layers(chunks):
            saved = layer.weight.detach().clone()
            layer.merge_()
            merged.append((layer, saved, {n: layer._parameters.pop(n) for n in ADAPTER_PARAMS}))
        yield
    finally:
        with torch.no_grad():
            for layer, saved, adapters in merged:
                layer.weight.copy_(saved)
                layer.merged = False
                for n, p in adapters.items():
                    layer.register_parameter(n, p)


def merge_lora(model_chunk: nn.Module) -> nn.Module:
    """Permanently fold the adapters into W and put plain Column/RowParallelLinear layers back (adapters
    dropped, every parameter trainable again): e.g. for an export of a finished run. In place; returns it."""
    for name, module in list(model_chunk.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        if not module.merged:
            module.merge_()
        base_cls = ColumnParallelLinear if isinstance(module, ColumnParallelLinear) else RowParallelLinear
        _set_submodule(model_chunk, name, _adopt(base_cls, module, skip=_LORA_ATTRS))
    for p in model_chunk.parameters():
        p.requires_grad_(True)
    return model_chunk


@torch.no_grad()
def lora_state(
    chunks: nn.Module | Sequence[nn.Module], tp_group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """{name: FULL tensor} of every adapter factor of this rank's chunks (global names, e.g.
    layers.3.mlp.linear_fc1.lora_A), gathered over tp along each factor's tp_dim. Collective over tp_group:
    every tp rank must call it. With pp each stage returns its own layers."""
    chunks = [chunks] if isinstance(chunks, nn.Module) else chunks
    out = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if is_adapter_name(name):
                tp_dim = getattr(p, "tp_dim", None)
                out[name] = (
                    p.detach() if tp_dim is None else all_gather_along_dim(p.detach(), tp_dim, tp_group)
                )
    return out
