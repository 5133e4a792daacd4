"""`rl generate`: sample completions for a JSONL file of prompts with the native or the vLLM engine.

Input rows: {"prompt": "text"} (tokenized with the model directory's tokenizer) or
{"prompt_token_ids": [ints]}. Output: one row per prompt, in input order:
    {"index": i, "prompt": text or null, "prompt_token_ids": [...],
     "samples": [{"text", "token_ids", "logprobs", "finish_reason"}, ...]}
logprobs are the engines' raw logprobs (log_softmax of the model's logits at temperature 1).
Every input is checked (model directory, each prompts row) before an engine is built; torch and vLLM are
imported only when generating, vLLM only for --engine vllm.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import InputError

ENGINES = ("native", "vllm")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PromptRow:
    text: str | None
    token_ids: list[int] | None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample completions for a JSONL file of prompts",
        description="Generate completions for each prompt of a JSONL file with our native engine or vLLM.",
    )
    p.add_argument(
        "--model", required=True, type=Path, metavar="DIR", help="HF model dir (or a run dir with hf/)"
    )
    p.add_argument(
        "--prompts",
        required=True,
        type=Path,
        metavar="FILE",
        help='JSONL: {"prompt": str} or {"prompt_token_ids": [...]} per line',
    )
    p.add_argument(
        "--output", required=True, type=Path, metavar="FILE", help="JSONL written, one row per prompt"
    )
    p.add_argument("--engine", choices=ENGINES, default="native", help="generation engine (default: native)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default: 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus filter (default: 1.0, off)")
    p.add_argument("--top-k", type=int, default=None, help="top-k filter (default: off)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per sample at most (default: 64)")
    p.add_argument("--seed", type=int, default=None, help="prompt i's samples use seeds seed + i * n, ...")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.add_argument(
        "--stop-token-id",
        action="append",
        type=int,
        default=[],
        metavar="ID",
        help="stop token id (repeatable)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context per sequence (default: longest prompt + --max-tokens)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="native: concurrent samples (default: 64)")
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="vllm: KV cache size (default: 0.5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.bridge.hf import check_hf_weights

    model_dir = resolve_model_dir(args.model)
    vocab_size = check_hf_weights(model_dir)[1].vocab_size  # every tensor there, of the config's shape
    rows = read_prompts(args.prompts)
    params = [sampling_params(args, i) for i in range(len(rows))]
    tokenizer = _load_tokenizer(model_dir, needed=any(r.text is not None for r in rows))
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise InputError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size="
            f"{vocab_size} (ids past it have no embedding)"
        )
    prompt_ids = [encode(r, tokenizer, args.prompts, i) for i, r in enumerate(rows)]
    for i, ids in enumerate(prompt_ids):
        if max(ids) >= vocab_size:
            raise InputError(
                f"{args.prompts}: prompt {i + 1} has token id {max(ids)}, past vocab_size={vocab_size}"
            )
    max_model_len = args.max_model_len or max(len(ids) for ids in prompt_ids) + args.max_tokens
    _check_context(model_dir, max_model_len)
    engine = build_engine(args, model_dir, max_model_len)
    try:
        results = generate_with_progress(engine, prompt_ids, params)
    finally:
        engine.shutdown()
    write_output(args.output, rows, prompt_ids, results, tokenizer)
    samples = sum(len(r.samples) for r in results)
    print(f"wrote {args.output} ({len(rows)} prompts, {samples} samples, engine {args.engine})")
    return 0


# ---- inputs ----------------------------------------------------------------------------------------------


def resolve_model_dir(path: Path) -> Path:
    """An HF directory (config.json + *.safetensors), or a run directory whose hf/ is one."""
    for candidate in (path, path / "hf"):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    if not path.exists():
        raise InputError(f"--model {path}: directory not found")
    raise InputError(
        f"--model {path}: no HF checkpoint (config.json + *.safetensors) there or in {path / 'hf'}"
    )


def read_prompts(path: Path) -> list[PromptRow]:
    if not path.is_file():
        raise InputError(f"--prompts {path}: file not found")
    from core.data.datasets import jsonl_lines

    rows = [_parse_row(line, where) for where, line in jsonl_lines(path)]
    if not rows:
        raise InputError(f"--prompts {path}: no prompts (the file is empty)")
    return rows


def _parse_row(line: str, where: str) -> PromptRow:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict) or ("prompt" in row) == ("prompt_token_ids" in row):
        raise InputError(f'{where}: expected an object with exactly one of "prompt" and "prompt_token_ids"')
    if "prompt" in row:
        text = row["prompt"]
        if not isinstance(text, str) or not text:
            raise InputError(f'{where}: "prompt" must be a non-empty string, got {text!r}')
        return PromptRow(text, None)
    ids = row["prompt_token_ids"]
    valid = isinstance(ids, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
    )
    if not valid or not ids:
        raise InputError(f'{where}: "prompt_token_ids" must be a non-empty list of token ids, got {ids!r}')
    return PromptRow(None, ids)


def _load_tokenizer(model_dir: Path, needed: bool) -> Any | None:
    has_files = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if not has_files:
        if needed:
            raise InputError(f'{model_dir}: no tokenizer files, so text "prompt" rows cannot be tokenized')
        return None
    from core.data.tokenizer import load_tokenizer

    return load_tokenizer(model_dir)


def encode(row: PromptRow, tokenizer: Any | None, path: Path, index: int) -> list[int]:
    if row.token_ids is not None:
        return row.token_ids
    ids = list(tokenizer(row.text)["input_ids"])
    if not ids:
        raise InputError(f"{path}: prompt {index + 1} tokenizes to no tokens")
    return ids


def _check_context(model_dir: Path, max_model_len: int) -> None:
    limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if limit is not None and max_model_len > limit:
        raise InputError(
            f"context of {max_model_len} tokens (longest prompt + --max-tokens, or --max-model-len) exceeds "
            f"the model's max_position_embeddings={limit}"
        )


def sampling_params(args: argparse.Namespace, index: int) -> Any:
    from rollout.types import SamplingParams

    return SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        seed=None if args.seed is None else args.seed + index * args.n,
        ignore_eos=args.ignore_eos,
    )


# ---- generation ------------------------------------------------------------------------------------------


def build_engine(args: argparse.Namespace, model_dir: Path, max_model_len: int) -> Any:
    seed = args.seed or 0
    if args.engine == "vllm":
        from rollout.engines.vllm_engine import VLLMEngine  # imports vLLM: only here

        return VLLMEngine(
            model_dir,
            dtype=args.dtype,
            max_model_len=max_model_len,
            kv_cache_gib=args.kv_cache_gib,
            seed=seed,
        )
    import torch

    from rollout.engines.native import NativeEngine

    return NativeEngine(
        model_dir=model_dir,
        max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs,
        dtype=getattr(torch, args.dtype),
        seed=seed,
    )


def generate_with_progress(engine: Any, prompt_ids: list[list[int]], params: list[Any]) -> list[Any]:
    """Results in prompt order; the progress bar advances as each prompt finishes."""
    import asyncio

    from tqdm import tqdm

    from rollout.types import GenerationRequest

    requests = [
        GenerationRequest(ids, p, request_id=str(i)) for i, (ids, p) in enumerate(zip(prompt_ids, params))
    ]

    async def collect() -> list[Any]:
        results: list[Any] = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate", unit="prompt") as bar:
            async for result in engine.generate_stream(requests):
                results[int(result.request_id)] = result
                bar.update(1)
        return results

    return asyncio.run(collect())


def write_output(
    path: Path, rows: list[PromptRow], prompt_ids: list[list[int]], results: list[Any], tokenizer: Any
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, (row, ids, result) in enumerate(zip(rows, prompt_ids, results)):
            samples = [_sample_row(s, tokenizer) for s in result.samples]
            out = {"index": i, "prompt": row.text, "prompt_token_ids": ids, "samples": samples}
            f.write(json.dumps(out) + "\n")


def _sample_row(sample: Any, tokenizer: Any | None) -> dict[str, Any]:
    text = sample.text
    if text is None and tokenizer is not None:
        text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
    return {
        "text": text,
        "token_ids": sample.token_ids,
        "logprobs": sample.logprobs,
        "finish_reason": sample.finish_reason,
    }
