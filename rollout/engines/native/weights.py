"""Stream HF-named tensors into a GPTModel's parameters in place (any TP layout).

The bridge converts one of our parameters from all of its HF tensors (a fused QKV needs q, k and v), so
incoming tensors wait in a small buffer until their parameter is complete; it is then converted, cut to
this rank's shard along `tp_dim` (the fused layouts are TP-invariant, core/transformer/attention.py)
and copied into the parameter, whose storage is kept (CUDA graphs and colocated trainers see the new
values). At most the HF tensors of partially received parameters are held at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NoReturn

import torch
import torch.distributed as dist

from core.bridge.convert import NameMap
from core.errors import InputError
from core.models import Architecture, ParamMap
from core.tensor_parallel.init import shard
from core.tensor_parallel.lora import is_adapter_name
from core.transformer.model import GPTModel
from rollout.engines.base import WeightUpdateRejected


class HFWeightLoader:
    """Copies full HF-named tensors into `model` (built with `tp_group`, any tp size)."""

    def __init__(self, model: GPTModel, arch: Architecture, tp_group: dist.ProcessGroup | None = None):
        self.model, self.arch, self.tp_group = model, arch, tp_group
        name_map = NameMap(model.config, arch)
        # A tied head appears once, as the embedding. LoRA factors are not weights an HF stream carries (a
        # LoRA model generating on its own parameters needs no loading; refits stream merged weights).
        self._params = {n: p for n, p in model.named_parameters() if not is_adapter_name(n)}
        self._maps: dict[str, tuple[ParamMap, list[str]]] = {n: name_map.lookup(n) for n in self._params}
        self._consumers: dict[str, list[str]] = {}  # HF name -> our parameters built from it
        for ours, (_, hf_names) in self._maps.items():
            for hf_name in hf_names:
                self._consumers.setdefault(hf_name, []).append(ours)

    @torch.no_grad()
    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Raise WeightUpdateRejected for a problem found before any parameter changed; InputError for
        one found later (the model then mixes old and new weights) or for tensors that never came."""
        pending: dict[str, dict[str, torch.Tensor]] = {}  # our name -> HF tensors received so far
        done: set[str] = set()
        for raw_name, tensor in named_tensors:
            hf_name = self._normalize(raw_name)
            if hf_name is None:
                continue
            if hf_name not in self._consumers:
                self._fail(f"unknown tensor {raw_name!r} for a {self.arch.name} model", changed=bool(done))
            for ours in self._consumers[hf_name]:
                received = pending.setdefault(ours, {})
                received[hf_name] = tensor
                if len(received) == len(self._maps[ours][1]):
                    self._copy(ours, pending.pop(ours), changed=bool(done))
                    done.add(ours)
        missing = sorted(set(self._params) - done)
        if missing:
            self._fail(
                f"{len(missing)} parameters got no (or partial) weights, e.g. {missing[:3]}", bool(done)
            )

    def _normalize(self, name: str) -> str | None:
        """The name as the bridge spells it; None for checkpoint entries that hold no weights."""
        if name not in self._consumers:
            prefixed = self.arch.hf_base_prefix + name
            if prefixed in self._consumers:
                return prefixed
            if any(re.fullmatch(p, name) for p in self.arch.ignore_hf):
                return None
        return name

    def _copy(self, ours: str, received: dict[str, torch.Tensor], changed: bool) -> None:
        param_map, hf_names = self._maps[ours]
        full = param_map.from_hf(tuple(received[h] for h in hf_names))
        param = self._params[ours]
        local = shard(full, getattr(param, "tp_dim", None), self.tp_group)
        if local.shape != param.shape:
            self._fail(
                f"{ours}: HF weights give shape {tuple(local.shape)} on this rank, expected {tuple(param.shape)}",
                changed,
            )
        param.copy_(local)

    @staticmethod
    def _fail(message: str, changed: bool) -> NoReturn:
        if changed:
            raise InputError(f"HF weights: {message}; the model now mixes old and new weights")
        raise WeightUpdateRejected(f"HF weights: {message}; the old weights stay")
