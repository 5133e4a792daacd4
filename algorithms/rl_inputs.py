"""What an RL run starts from: the initial model (from any kind of directory) and its prompts.

Model sources (`resolve_init`), checked before anything is written:
    an HF checkpoint directory       config.json + *.safetensors (tokenizer files next to them)
    a converted native directory     model_config.json + model.safetensors (`rl convert`)
    a run directory of any stage     its hf/ export when present, else its newest checkpoint
    a checkpoint of any stage        run_dir/checkpoints/step_N: meta.json names the stage, architecture
                                     and tokenizer (tokenizer/ inside); older `rl pretrain` checkpoints
                                     without it take the architecture from run_dir/config.yaml

Prompts: JSONL rows {"prompt": str, ...} (other fields, e.g. "answer", travel to the environment), or the
embedded arithmetic task generated from a seed. `PromptLoader` walks them in a seeded order per epoch and
its position is part of every checkpoint, so a resumed run sees the prompts the uninterrupted one would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import InputError

Row = dict[str, Any]


# ---- the initial model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitSource:
    """Where the initial weights come from. kind: "hf" | "native" | "checkpoint"; path: the directory read;
    tokenizer: the tokenizer directory found next to the weights (None when there is none)."""

    kind: str
    path: Path
    tokenizer: Path | None
    run_dir: Path | None = None  # the run a checkpoint belongs to
    meta: dict[str, Any] | None = None  # a checkpoint's meta.json


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def resolve_init(path: str | Path) -> InitSource:
    """Classifies `path` (see the module docstring) and checks its weights without loading them: every
    tensor the architecture needs is there, of the shape its config makes, and a checkpoint's files load as
    plain data (core/checkpoint/safe_load.py). InputError (one line) naming what is wrong otherwise."""
    source = _classify(path)
    check_weights(source)
    return source


def _classify(path: str | Path) -> InitSource:
    p = Path(path)
    if not p.exists():
        raise InputError(
            f"model.init_from: {p} not found (the tiny recipes start from `rl pretrain "
            "configs/pretrain_tiny.yaml`: run it first, or point model.init_from at a model)"
        )
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return InitSource("hf", p, p if _has_tokenizer(p) else None)
    if (p / "model_config.json").is_file():
        return InitSource("native", p, p if _has_tokenizer(p) else None)
    if (p / "hf" / "config.json").is_file():
        return _classify(p / "hf")
    if (p / "reward_model" / "model_config.json").is_file():  # an `rl rm` run's export
        return _classify(p / "reward_model")
    if (p / "checkpoints").is_dir():
        from core.checkpoint.checkpointer import latest_checkpoint

        latest = latest_checkpoint(p / "checkpoints")
        if latest is None:
            raise InputError(f"model.init_from: run directory {p} has no hf/ and no complete checkpoint")
        return _classify(latest)
    if (p / "COMPLETE").is_file() and (p / "model").is_dir():
        from core.checkpoint.checkpointer import TOKENIZER_DIR, read_meta

        run_dir = p.parent.parent
        meta = read_meta(p)
        if meta is not None:
            tok = p / TOKENIZER_DIR
            return InitSource("checkpoint", p, tok if _has_tokenizer(tok) else None, run_dir, meta)
        if not (run_dir / "config.yaml").is_file():
            raise InputError(
                f"model.init_from: checkpoint {p} has no {run_dir / 'config.yaml'} (its architecture)"
            )
        tok = run_dir / "data" / "tokenizer"
        return InitSource("checkpoint", p, tok if tok.is_dir() else None, run_dir)
    raise InputError(
        f"model.init_from: {p} is not an HF checkpoint, a converted model, a run directory or one of its "
        "checkpoints/step_N"
    )


def check_weights(source: InitSource) -> None:
    """The source's tensors against its architecture, from headers and metadata only (see resolve_init)."""
    if source.kind == "hf":
        from core.bridge.hf import check_hf_weights

        check_hf_weights(source.path)
    elif source.kind == "native":
        from core.bridge.native import check_native_weights

        check_native_weights(source.path)
    else:
        from core.checkpoint.safe_load import read_dcp_metadata, verify_checkpoint

        verify_checkpoint(source.path)
        if source.meta is not None:
            _check_checkpoint_shapes(source.path / "model", read_dcp_metadata(source.path / "model"), source)


def _check_checkpoint_shapes(model_dir: Path, metadata: Any, source: InitSource) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from core.transformer.model import GPTModel

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in GPTModel(init_config(source)).named_parameters()}
    stored = metadata.state_dict_metadata
    for name, want in expected.items():
        md = stored.get(name)
        if not isinstance(md, TensorStorageMetadata):
            raise InputError(f"{model_dir}: no tensor {name}, which the model in its meta.json has")
        if tuple(md.size) != want:
            raise InputError(
                f"{model_dir}: tensor {name} has shape {tuple(md.size)}, but the model in its meta.json makes "
                f"it {want}"
            )


def init_config(source: InitSource) -> Any:
    """The source's TransformerConfig, read without loading weights where possible."""
    if source.kind == "hf":
        from core.bridge.hf import read_hf_config

        return read_hf_config(source.path)[1]
    if source.meta is not None:
        from core.transformer.config import TransformerConfig

        return TransformerConfig.from_dict(source.meta["model_config"])
    return load_init_model(source).config


def init_arch_name(source: InitSource) -> str | None:
    """The source's architecture preset name (llama, qwen2, ...), when it says."""
    if source.kind == "hf":
        from core.bridge.hf import read_hf_config

        return read_hf_config(source.path)[0].name
    if source.meta is not None:
        return source.meta["arch"]
    return None


def load_init(source: InitSource) -> tuple[torch.nn.Module, Any]:
    """(the whole initial model, its HF architecture or None)."""
    return load_init_model(source), init_arch_name(source)


def load_init_model(source: InitSource) -> torch.nn.Module:
    """The whole initial model (GPTModel) on the CPU in fp32."""
    if source.kind == "hf":
        from core.bridge import load_hf

        return load_hf(source.path)
    if source.kind == "native":
        from core.bridge import load_native

        return load_native(source.path)[0]
    return _load_checkpoint(source)


def _load_checkpoint(source: InitSource) -> torch.nn.Module:
    from core.checkpoint.sharded import OPTIM_PREFIX, load_full_state
    from core.transformer.model import GPTModel

    model = GPTModel(init_config(source) if source.meta is not None else _legacy_config(source))
    state = {
        k: v for k, v in load_full_state(source.path / "model").items() if not k.startswith(OPTIM_PREFIX)
    }
    if source.meta is not None and source.meta.get("lora"):
        state = merge_adapters(state, source.meta["lora"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise InputError(
            f"{source.path}: checkpoint does not match its run's config: {missing[:3] + unexpected[:3]}"
        )
    return model


def merge_adapters(state: dict[str, torch.Tensor], lora: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A LoRA run's checkpoint as plain weights: W + (alpha / rank) * B @ A for every adapted layer
    (fp32, exact up to rounding), adapter factors dropped."""
    scale = float(lora["alpha"]) / int(lora["rank"])
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, a in state.items():
        if name.endswith(".lora_A"):
            layer = name.removesuffix(".lora_A")
            b = state[f"{layer}.lora_B"]
            weight = out[f"{layer}.weight"]
            out[f"{layer}.weight"] = (weight.double() + scale * (b.double() @ a.double())).to(weight.dtype)
    return out


def _legacy_config(source: InitSource) -> Any:
    """The architecture of a checkpoint written before meta.json: from its `rl pretrain` run's config."""
    from algorithms.pretrain import PretrainConfig
    from core.data.tokenizer import load_tokenizer

    assert source.run_dir is not None
    cfg = _read_pretrain_config(source.run_dir / "config.yaml", PretrainConfig)
    tokenizer_dir = cfg.data.tokenizer or source.tokenizer
    vocab = len(load_tokenizer(tokenizer_dir)) if tokenizer_dir else cfg.model.vocab_size or 64
    return cfg.model.transformer_config(vocab)


def _read_pretrain_config(path: Path, schema: type) -> Any:
    import yaml
    from pydantic import ValidationError

    try:
        return schema.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as e:
        raise InputError(f"{path}: not an `rl pretrain` config ({e.errors()[0]['msg']})") from None


# ---- prompts --------------------------------------------------------------------------------------------


def read_prompt_file(
    path: str | Path, check_row: Callable[[Row, str], None], prompt_key: str = "prompt"
) -> list[Row]:
    """Rows of a JSONL file; each must have a non-empty string `prompt_key` and pass `check_row`
    (the environment's own check, e.g. that a reference answer is present). The prompt is stored under
    "prompt" whatever the key."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompts file not found: {p}")
    from core.data.datasets import jsonl_lines

    rows = []
    for where, line in jsonl_lines(p):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(prompt_key), str) or not row[prompt_key]:
            raise InputError(f"{where}: expected an object with a non-empty string {prompt_key!r}")
        row = {**row, "prompt": row[prompt_key]}
        check_row(row, where)
        rows.append(row)
    if not rows:
        raise InputError(f"{p}: no prompts (the file is empty)")
    return rows


def arithmetic_prompts(
    n_train: int, n_eval: int, digits: int, ops: str, seed: int
) -> tuple[list[Row], list[Row]]:
    """Train and held-out rows {"prompt": "12+34=", "answer": "46"} of the embedded task (disjoint)."""
    from core.data.synthetic import generate_arithmetic

    train, held_out = generate_arithmetic(n_train, n_eval, seed, digits, tuple(ops))
    return [_row(p) for p in train], [_row(p) for p in held_out]


def _row(problem: Any) -> Row:
    return {"prompt": problem.prompt, "answer": problem.answer}


class PromptLoader:
    """Batches of (index, row) in a seeded order that changes every epoch; a batch may span two epochs.

    State: {"epoch", "position"}; restoring it replays exactly the batches that followed.
    """

    def __init__(self, rows: list[Row], batch_size: int, seed: int, shuffle: bool = True) -> None:
        if not rows:
            raise InputError("no prompts to train on")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._order_of(0)

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[tuple[int, Row]]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._order_of(self.epoch)
            index = self._order[self.position]
            batch.append((index, self.rows[index]))
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """A position saved over another number of rows cannot be replayed: InputError saying so (a
        resumed run must see the data the interrupted one saw)."""
        rows = int(state.get("rows", len(self.rows)))
        if rows != len(self.rows) or int(state["position"]) > len(self.rows):
            raise InputError(
                f"the checkpoint was written over {rows} rows but the data now has {len(self.rows)}: resume "
                "with the same data, or start a new run.dir"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._order_of(self.epoch)
