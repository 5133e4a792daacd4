"""`rl bench generate`: generation throughput (new tokens/s) of our engines next to HF `generate`.

Every implementation decodes the same random prompts (seeded token ids, one length) for exactly
`new_tokens` tokens greedily (EOS ignored), on the same random weights: our GPTModel of the preset,
written once with `save_hf` so vLLM and transformers load the very same tensors.

Warmup: one untimed run of the same shape before the timed one. The native engine captures a CUDA
graph per (rows, kv-length) bucket on first use and transformers' static cache compiles per cache
shape, so a smaller warmup would leave capture and compilation inside the timed run.

An implementation that cannot run here (vLLM not installed, static cache on CPU, an error at build
or generate time) gets a row saying why instead of a number; the benchmark never stops on it.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel

ENGINES = ("hf", "hf-static", "native", "vllm")
BASELINE = "hf generate"
ROW_NAMES = {
    "hf": BASELINE,
    "hf-static": "hf generate static cache",
    "native": "tandem native engine",
    "vllm": "vLLM",
}

# (batch of prompt token-id lists) -> number of new tokens produced, after the device is idle again.
GenerateFn = Callable[[list[list[int]]], int]


@dataclass
class GenShape:
    batch: int
    prompt_len: int
    new_tokens: int
    device: torch.device
    dtype: torch.dtype

    @property
    def max_model_len(self) -> int:
        return self.prompt_len + self.new_tokens


@dataclass
class GenResult:
    name: str
    new_tokens: int | None = None
    seconds: float | None = None
    skipped: str | None = None  # why there is no timing

    @property
    def tokens_per_s(self) -> float | None:
        return self.new_tokens / self.seconds if self.seconds else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_random_model(config: TransformerConfig, seed: int = 0) -> GPTModel:
    """The preset with random (seeded) fp32 weights on the CPU, in eval mode."""
    torch.manual_seed(seed)
    return GPTModel(config).eval()


def write_placeholder_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer covering every id, so engines that insist on a tokenizer (vLLM) start.
    The benchmarks feed token ids only; the words are never read."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", "model_max_length": 1 << 20}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config) + "\n")


def save_checkpoint(model: GPTModel, out_dir: Path) -> Path:
    """HF checkpoint of `model` (its dtype) plus a placeholder tokenizer, for vLLM and transformers."""
    from core.bridge import save_hf

    save_hf(model, out_dir)
    write_placeholder_tokenizer(out_dir, model.config.vocab_size)
    return out_dir


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=g).tolist()


# ---- implementations: each builds its engine and returns (generate_fn, close_fn) ----------------


def hf_generate_fn(model_dir: Path, shape: GenShape, static_cache: bool) -> tuple[GenerateFn, Callable]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=shape.dtype, attn_implementation="sdpa")
    hf = hf.to(shape.device).eval()
    extra = {"cache_implementation": "static"} if static_cache else {}

    @torch.inference_mode()
    def generate(prompts: list[list[int]]) -> int:
        input_ids = torch.tensor(prompts, device=shape.device)  # (B, T) -- one length, no padding
        out = hf.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            min_new_tokens=shape.new_tokens,
            max_new_tokens=shape.new_tokens,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )  # (B, T + new_tokens)
        sync(shape.device)
        return out[:, input_ids.shape[1] :].numel()

    return generate, lambda: None


def _engine_generate_fn(engine, shape: GenShape) -> GenerateFn:
    from rollout.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=shape.new_tokens, ignore_eos=True, temperature=0.0, logprobs=False)

    def generate(prompts: list[list[int]]) -> int:
        results = engine.generate([GenerationRequest(p, params) for p in prompts])
        sync(shape.device)
        return sum(len(s.token_ids) for r in results for s in r.samples)

    return generate


def native_generate_fn(model: GPTModel, shape: GenShape) -> tuple[GenerateFn, Callable]:
    """Colocated on `model` (already on the device in the benchmark dtype); CUDA graphs on CUDA."""
    from rollout.engines.native.engine import NativeEngine

    engine = NativeEngine(
        model=model, max_model_len=shape.max_model_len, max_num_seqs=shape.batch, cuda_graphs=True
    )
    return _engine_generate_fn(engine, shape), engine.shutdown


def vllm_kv_cache_gib(config: TransformerConfig, shape: GenShape) -> float:
    """KV cache for the whole batch at full length, 25% + 64 MiB headroom for vLLM's block rounding."""
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * shape.dtype.itemsize
    return 1.25 * shape.batch * shape.max_model_len * per_token / 2**30 + 1 / 16


def vllm_generate_fn(
    model_dir: Path, shape: GenShape, config: TransformerConfig
) -> tuple[GenerateFn, Callable]:
    from rollout.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        model_dir,
        dtype="bfloat16" if shape.dtype == torch.bfloat16 else "float32",
        max_model_len=shape.max_model_len,
        kv_cache_gib=vllm_kv_cache_gib(config, shape),
        in_process=True,
        enforce_eager=shape.device.type != "cuda",  # CUDA graphs where vLLM has them
    )
    return _engine_generate_fn(engine, shape), engine.shutdown


# ---- timing ----------------------------------------------------------------------------------


def time_engine(
    name: str, build: Callable[[], tuple[GenerateFn, Callable]], prompts: list[list[int]]
) -> GenResult:
    """Build, one untimed warmup run of the same shape, one timed run. Any failure becomes a skipped row."""
    close: Callable = lambda: None  # noqa: E731
    try:
        generate, close = build()
        generate(prompts)
        start = time.perf_counter()
        new_tokens = generate(prompts)
        seconds = time.perf_counter() - start
        return GenResult(name, new_tokens, seconds)
    except Exception as exc:  # noqa: BLE001 -- a benchmark row, not a crash
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        return GenResult(name, skipped=f"{type(exc).__name__}: {first_line}")
    finally:
        close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def unavailable(engine: str, device: torch.device) -> str | None:
    """Why `engine` cannot run here, checked before building anything; None when it may."""
    if engine == "hf-static" and device.type != "cuda":
        return "CUDA only (transformers compiles the static-cache forward)"
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception as exc:  # noqa: BLE001 -- ImportError or a broken install alike
            return f"vllm does not import: {type(exc).__name__}: {str(exc)[:120]}"
    return None


def run_generate_bench(
    config: TransformerConfig, shape: GenShape, engines: Sequence[str], workdir: Path, seed: int = 0
) -> list[GenResult]:
    """One row per engine, in ENGINES order (vLLM last: in-process it reseeds and pins threads)."""
    model = build_random_model(config, seed)
    model_dir = save_checkpoint(model.to(shape.dtype), workdir / "hf")
    model = model.to(shape.device)
    prompts = random_prompts(shape.batch, shape.prompt_len, config.vocab_size, seed)
    builders = {
        "hf": lambda: hf_generate_fn(model_dir, shape, static_cache=False),
        "hf-static": lambda: hf_generate_fn(model_dir, shape, static_cache=True),
        "native": lambda: native_generate_fn(model, shape),
        "vllm": lambda: vllm_generate_fn(model_dir, shape, config),
    }
    results = []
    for engine in (e for e in ENGINES if e in engines):
        name = ROW_NAMES[engine]
        reason = unavailable(engine, shape.device)
        results.append(
            GenResult(name, skipped=reason) if reason else time_engine(name, builders[engine], prompts)
        )
    return results


def format_table(results: list[GenResult], baseline: str = BASELINE) -> str:
    base = next((r for r in results if r.name == baseline and r.tokens_per_s), None)
    lines = [f"{'implementation':<28} {'tokens/s':>12} {'seconds':>9} {'new tokens':>11} {'vs base':>8}"]
    for r in results:
        if r.tokens_per_s is None:
            lines.append(f"{r.name:<28} {'skipped':>12}  {r.skipped}")
            continue
        ratio = f"{r.tokens_per_s / base.tokens_per_s:7.2f}x" if base else "       "
        lines.append(f"{r.name:<28} {r.tokens_per_s:12,.0f} {r.seconds:9.3f} {r.new_tokens:11,d} {ratio}")
    return "\n".join(lines)
