"""What the alignment loops (sft, dpo, rm) read before they train: the model source with its tokenizer,
preference pairs (from files, or sampled for the embedded task from the starting model itself), and the
prompts of held-out rows for task accuracy by generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from algorithms.model_config import SourceModelConfig
from core.config import InputPath, Schema
from core.errors import InputError
from core.transformer.model import GPTModel


def source_tokenizer(model: SourceModelConfig) -> tuple[Any, Any, Path]:
    """(the model source, its tokenizer, the tokenizer directory), checked against the model section."""
    from algorithms.rl_inputs import init_arch_name, init_config, resolve_init
    from core.data.tokenizer import load_tokenizer

    source = resolve_init(model.init_from)
    config = init_config(source)
    model.check_source(config, init_arch_name(source))
    tokenizer_dir = Path(model.tokenizer) if model.tokenizer else source.tokenizer
    if tokenizer_dir is None:
        raise InputError(f"model.tokenizer: no tokenizer next to {source.path}; set model.tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > config.vocab_size:
        raise InputError(
            f"model.tokenizer: {tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
            f"vocab_size={config.vocab_size}"
        )
    return source, tokenizer, tokenizer_dir


def eval_prompt(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], str]:
    """(the prompt ids a held-out row is answered from, the prompt text the verifier reads)."""
    from core.data.alignment import _render_ids

    if "messages" in record:
        messages = record["messages"]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return _render_ids(tokenizer, messages, "eval", add_generation_prompt=True), messages[-1]["content"]
    from algorithms.evaluation import encode_prompt

    return encode_prompt(tokenizer, record["prompt"]), record["prompt"]


# ---- preference pairs ---------------------------------------------------------------------------------


class PairSyntheticConfig(Schema):
    """Arithmetic pairs: the correct answer is chosen; the rejected one is a wrong answer
    rejected=sampled: SAMPLED FROM THE INITIAL MODEL (its own likely mistakes, mostly near misses;
                      prompts whose samples are all correct give no pair)
    rejected=random:  drawn uniformly from the wrong numbers with as many digits as the answer can have
                      (no model needed; every prompt gives a pair)."""

    rejected: Literal["sampled", "random"] = "sampled"
    n_train: int = Field(2000, ge=1, description="prompts to sample for training pairs")
    n_eval: int = Field(200, ge=1, description="held-out prompts")
    digits: int = Field(2, ge=1, le=6)
    ops: str = Field("+", pattern=r"^[+\-*]+$")
    seed: int = 3
    samples: int = Field(4, ge=1, description="samples per prompt to find a wrong answer among")
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(6, ge=1)


class PairDataConfig(Schema):
    path: InputPath | None = Field(
        None, description="pairs {prompt, chosen, rejected} (text or chat messages)"
    )
    eval_path: InputPath | None = None
    synthetic: PairSyntheticConfig | None = None
    max_len: int = Field(128, ge=2, description="tokens of prompt + the longer response")
    truncation: Literal["off", "right"] = "off"
    shuffle: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> PairDataConfig:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of data.path and data.synthetic")
        return self


def synthesize_pairs(cfg: Any, source: Any, tokenizer: Any) -> tuple[Path, Path]:
    """train/eval pair files under run.dir/data, sampled once from the initial model (reused after)."""
    syn = cfg.data.synthetic
    data_dir = Path(cfg.run.dir) / "data"
    train, held_out, stamp = (
        data_dir / "pairs_train.jsonl",
        data_dir / "pairs_eval.jsonl",
        data_dir / "pairs.json",
    )
    want = json.dumps({**syn.model_dump(), "init_from": str(cfg.model.init_from)}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want and train.is_file() and held_out.is_file():
        return train, held_out
    from algorithms.rl_inputs import arithmetic_prompts, load_init

    train_rows, eval_rows = arithmetic_prompts(syn.n_train, syn.n_eval, syn.digits, syn.ops, syn.seed)
    if syn.rejected == "random":
        pairs = random_pairs(train_rows + eval_rows, syn)
    else:
        torch.manual_seed(syn.seed)
        model, arch = load_init(source)
        pairs = sampled_pairs(model, arch, tokenizer, train_rows + eval_rows, syn)
    data_dir.mkdir(parents=True, exist_ok=True)
    n = len(train_rows)
    _write_jsonl(train, [p for i, p in pairs if i < n])
    _write_jsonl(held_out, [p for i, p in pairs if i >= n])
    stamp.write_text(want)
    return train, held_out


def random_pairs(rows: list[dict], syn: PairSyntheticConfig) -> list[tuple[int, dict]]:
    """(row index, pair) with a uniformly drawn wrong answer for every row (seeded)."""
    import random

    rng = random.Random(syn.seed)
    top = 10 ** (syn.digits + 1)  # sums have up to digits + 1 digits
    pairs = []
    for i, row in enumerate(rows):
        wrong = row["answer"]
        while wrong == row["answer"]:
            wrong = str(rng.randrange(top))
        pairs.append((i, _pair(row, wrong)))
    return pairs


def _pair(row: dict, rejected: str) -> dict:
    return {"prompt": row["prompt"], "chosen": row["answer"], "rejected": rejected, "answer": row["answer"]}


def sampled_pairs(model: GPTModel, arch: Any, tokenizer: Any, rows: list[dict], syn: PairSyntheticConfig):
    """(row index, {"prompt", "chosen", "rejected", "answer"}) for every row with a wrong sample."""
    from algorithms.evaluation import encode_prompt
    from core.data.synthetic import score_arithmetic
    from rollout.engines.native import NativeEngine
    from rollout.types import GenerationRequest, SamplingParams

    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    engine = NativeEngine(
        model.eval(),
        max_model_len=min(model.config.max_position_embeddings, max(map(len, prompts)) + syn.max_tokens),
        max_num_seqs=256,
        seed=syn.seed,
        eos_token_ids=eos,
        arch=arch,
    )
    params = [
        SamplingParams(
            n=syn.samples, temperature=syn.temperature, max_tokens=syn.max_tokens, seed=syn.seed + i
        )
        for i in range(len(rows))
    ]
    results = engine.generate(
        [GenerationRequest(p, s, request_id=str(i)) for i, (p, s) in enumerate(zip(prompts, params))]
    )
    engine.shutdown()
    pairs = []
    for i, (row, result) in enumerate(zip(rows, results, strict=True)):
        for sample in result.samples:
            text = tokenizer.decode([t for t in sample.token_ids if t not in eos], skip_special_tokens=True)
            if text.strip() and text.strip() != row["answer"] and not score_arithmetic(row["prompt"], text):
                pairs.append((i, _pair(row, text)))
                break
    return pairs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def pair_paths(cfg: Any) -> tuple[Path, Path | None]:
    if cfg.data.synthetic is not None:
        data_dir = Path(cfg.run.dir) / "data"
        return data_dir / "pairs_train.jsonl", data_dir / "pairs_eval.jsonl"
    return Path(cfg.data.path), Path(cfg.data.eval_path) if cfg.data.eval_path else None
