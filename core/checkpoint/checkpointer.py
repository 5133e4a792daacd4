"""Atomic training checkpoints: checkpoints/step_N, written under a temporary name and then renamed.

A checkpoint directory holds
  model/              torch.distributed.checkpoint (DCP) shards of the model and optimizer state (global
                      names and offsets: it loads at any parallel layout)
  trainer.pt          the loop's state: step, scheduler, data position, ... (rank 0's view)
  rng_rank{R}.pt      each rank's RNG states
  meta.json           what the checkpoint is, for the next stage: {"stage", "step", "arch",
                      "model_config", "tokenizer"} (the architecture as our TransformerConfig and its HF
                      name; the tokenizer files are copied into tokenizer/ next to it)
  COMPLETE            written last, inside the temporary directory, before the rename
A crash or SIGKILL at any point leaves either the previous good checkpoint or a `.tmp-*` directory that
`latest_checkpoint` ignores and the next save removes, never a half-written `step_N`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from core.errors import InputError

STEP_RE = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
META = "meta.json"
TOKENIZER_DIR = "tokenizer"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_RE.match(child.name)
        if m and (child / MARKER).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _prune(root: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ---- one checkpoint manager for every loop -------------------------------------------------------------


class CheckpointManager:
    """checkpoints/step_N of one run, for every loop (pretrain, sft, dpo, rm, grpo, ...).

    save: `write_model(tmp)` fills tmp/model (and whatever else the loop's model needs: a scheduler, ...)
    collectively on every rank; the manager adds the loop state (`trainer.pt`, from Stateful-like
    objects' state_dict()), each rank's RNG, meta.json, the tokenizer files and the COMPLETE marker, then
    renames tmp to step_N (atomic) and prunes to keep_last. Works in a single process, on every rank of a
    torch.distributed world, and on a Ray driver whose workers write the model (no world there).
    """

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root, self.keep_last = Path(root), keep_last

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(
        self,
        step: int,
        write_model: Callable[[Path], None],
        state: dict[str, Any],
        meta: dict[str, Any],
        tokenizer_dir: str | Path | None = None,
    ) -> Path:
        final, tmp = self.root / f"step_{step}", self.root / f".tmp-step_{step}"
        if _is_rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        write_model(tmp)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save({"rng": rng_state()}, tmp / f"rng_rank{rank}.pt")
        _barrier()
        if _is_rank0():
            torch.save(state, tmp / "trainer.pt")
            if tokenizer_dir is not None:
                from core.bridge.hf import copy_tokenizer_files

                (tmp / TOKENIZER_DIR).mkdir()
                copy_tokenizer_files(tokenizer_dir, tmp / TOKENIZER_DIR)
            (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2) + "\n")
            (tmp / MARKER).write_text(f"{step}\n")
            _fsync_tree(tmp)
            if final.exists():  # a re-save of the same step after a resume: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _prune(self.root, self.keep_last)
        _barrier()
        return final

    @staticmethod
    def load_state(path: str | Path) -> dict[str, Any]:
        """The loop state of a complete checkpoint, with this rank's RNG under "rng" (when saved)."""
        path = Path(path)
        if not (path / MARKER).is_file():
            raise InputError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
        state = torch.load(path / "trainer.pt", weights_only=False)
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_file = path / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            state["rng"] = torch.load(rng_file, weights_only=False)["rng"]
        return state


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """meta.json of a checkpoint directory (None for checkpoints written before it existed)."""
    file = Path(path) / META
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    for key in ("stage", "step", "arch", "model_config"):
        if key not in meta:
            raise InputError(f"{file}: missing field {key!r}")
    return meta
