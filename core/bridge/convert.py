"""Per-parameter conversion between our names/layouts and an HF architecture's.

Every function here handles one of our parameters at a time (a fused parameter maps to several HF tensors,
never the other way round), so callers can stream: a refit gathers one parameter, converts, sends, frees.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from core.models import Architecture, ParamMap, get_architecture, infer_architecture
from core.transformer.config import TransformerConfig

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def resolve_architecture(arch: Architecture | str | None, config: TransformerConfig) -> Architecture:
    if isinstance(arch, Architecture):
        return arch
    return infer_architecture(config) if arch is None else get_architecture(arch)


class NameMap:
    """Finds the ParamMap of one of our parameter names and the HF names it stands for."""

    def __init__(self, config: TransformerConfig, arch: Architecture):
        self._maps = [(self._pattern(m.ours), m) for m in arch.param_maps(config)]

    @staticmethod
    def _pattern(template: str) -> re.Pattern[str]:
        return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")

    def lookup(self, name: str) -> tuple[ParamMap, list[str]]:
        for pattern, m in self._maps:
            match = pattern.match(name)
            if match:
                layer = match.groupdict().get("i")
                return m, [h.format(i=layer) for h in m.hf]
        raise KeyError(f"no HF mapping for parameter {name!r}")


def ours_to_hf_iter(
    named_params: NamedTensors, config: TransformerConfig, arch: Architecture | str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, full or TP-shard tensor) -> (HF name, tensor) for each HF tensor it holds, in order.

    Tensors are detached and contiguous; they may share storage with the input. Load-only aliases (a tied
    output head) yield nothing.
    """
    names = NameMap(config, resolve_architecture(arch, config))
    for name, tensor in named_params:
        m, hf_names = names.lookup(name)
        if not m.export:
            continue
        hf_tensors = m.to_hf(tensor.detach())
        if len(hf_tensors) != len(hf_names):
            raise ValueError(f"{name}: got {len(hf_tensors)} tensors for {len(hf_names)} HF names")
        for hf_name, t in zip(hf_names, hf_tensors, strict=True):
            yield hf_name, t.contiguous()


def export_hf_weights(
    source: nn.Module | NamedTensors, config: TransformerConfig, arch: Architecture | str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named weights of a GPTModel (or any (our name, tensor) stream), one parameter at a time."""
    named = source.named_parameters() if isinstance(source, nn.Module) else source
    return ours_to_hf_iter(named, config, arch)


def expected_hf_shapes(config: TransformerConfig, arch: Architecture | str | None = None) -> dict[str, tuple]:
    """{HF name: shape} of every tensor the model `config` describes exports; built on the meta device, so
    nothing is allocated. What a checkpoint's tensors are checked against before any is read."""
    from core.transformer.model import GPTModel

    with torch.device("meta"):
        model = GPTModel(config)
    return {name: tuple(t.shape) for name, t in export_hf_weights(model, config, arch)}


def hf_to_ours_tensors(
    read: Callable[[str], torch.Tensor],
    names: Iterable[str],
    config: TransformerConfig,
    arch: Architecture | str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """For each of our parameter names, read its HF tensors (read(hf_name)) and yield (name, our tensor).

    Only the names asked for are read, so a pipeline stage loads just its layers.
    """
    name_map = NameMap(config, resolve_architecture(arch, config))
    for name in names:
        m, hf_names = name_map.lookup(name)
        yield name, m.from_hf(tuple(read(h) for h in hf_names))


def hf_names_read(names: Iterable[str], config: TransformerConfig, arch: Architecture) -> set[str]:
    """The HF tensors that hf_to_ours_tensors reads for these names."""
    name_map = NameMap(config, arch)
    return {h for name in names for h in name_map.lookup(name)[1]}
