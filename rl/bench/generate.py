"""`rl bench generate`: generation throughput (new tokens/s) of our engines next to HF `generate`.

Every implementation decodes the same random prompts (seeded token ids, one length) for exactly
`new_tokens` tokens per sample (EOS ignored), `n` samples per prompt, greedily (temperature 0) or sampled
(temperature, top-p), on the same random weights: our GPTModel of the preset, written once with `save_hf`
so vLLM and transformers load the very same tensors.

KV memory: the native engine's row shows the bytes its paged pool reserves and the bytes of the blocks
held at the peak (what the tokens needed); the line above the table gives what an unpaged cache (one
max_model_len slot per sample) would reserve. On CUDA the pool is capped to the free memory (a long
shape then preempts, and the row says how often); transformers' rows are skipped when their KV cache
(batch * n * max_model_len positions) cannot fit.

Warmup: one untimed run of the same shape before the timed one (or of fewer new tokens, for long shapes,
--warmup-new-tokens). The native engine captures a CUDA graph per (rows, kv-length) bucket on first use
and transformers' static cache compiles per cache shape, so a shorter warmup leaves some capture and
compilation inside the timed run.

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
BASELINES = {"hf": BASELINE, "hf-static": ROW_NAMES["hf-static"], "vllm": ROW_NAMES["vllm"]}
KV_FRACTION = 0.8  # of the free device memory after the weights, for a KV cache

# (batch of prompt token-id lists, new tokens per sample) -> number of new tokens produced, after the
# device is idle again.
GenerateFn = Callable[[list[list[int]], int], int]


@dataclass
class GenShape:
    batch: int
    prompt_len: int
    new_tokens: int
    device: torch.device
    dtype: torch.dtype
    n: int = 1  # samples per prompt
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    @property
    def max_model_len(self) -> int:
        return self.prompt_len + self.new_tokens

    @property
    def num_samples(self) -> int:
        return self.batch * self.n

    def kv_bytes_per_token(self, config: TransformerConfig) -> int:
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * self.dtype.itemsize

    def unpaged_kv_bytes(self, config: TransformerConfig) -> int:
        """An unpaged cache: one max_model_len slot per sample."""
        return self.num_samples * self.max_model_len * self.kv_bytes_per_token(config)


@dataclass
class GenResult:
    name: str
    new_tokens: int | None = None
    seconds: float | None = None
    skipped: str | None = None  # why there is no timing
    kv_reserved_bytes: int | None = None  # engines that report their KV memory
    kv_peak_bytes: int | None = None
    preemptions: int | None = None

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

    if shape.temperature > 0:
        extra |= {"do_sample": True, "temperature": shape.temperature, "top_p": shape.top_p, "top_k": None}
    else:
        extra |= {"do_sample": False}

    @torch.inference_mode()
    def generate(prompts: list[list[int]], new_tokens: int) -> int:
        input_ids = torch.tensor(prompts, device=shape.device)  # (B, T) -- one length, no padding
        out = hf.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            num_return_sequences=shape.n,
            pad_token_id=0,
            **extra,
        )  # (B * n, T + new_tokens)
        sync(shape.device)
        return out[:, input_ids.shape[1] :].numel()

    return generate, lambda: None


def _engine_generate_fn(engine, shape: GenShape) -> GenerateFn:
    from rollout.types import GenerationRequest, SamplingParams

    def params(new_tokens: int) -> SamplingParams:
        return SamplingParams(
            n=shape.n,
            temperature=shape.temperature,
            top_p=shape.top_p,
            max_tokens=new_tokens,
            ignore_eos=True,
            logprobs=False,
        )

    def generate(prompts: list[list[int]], new_tokens: int) -> int:
        results = engine.generate([GenerationRequest(p, params(new_tokens)) for p in prompts])
        sync(shape.device)
        return sum(len(s.token_ids) for r in results for s in r.samples)

    return generate


def native_kv_cache_tokens(
    config: TransformerConfig, shape: GenShape, kv_cache_gib: float | None, block_size: int
) -> int:
    """The native pool: kv_cache_gib if given, else every sample's full length in whole blocks (never
    preempts), capped on CUDA at KV_FRACTION of the free memory; at least one sequence."""
    per_token = shape.kv_bytes_per_token(config)
    if kv_cache_gib is not None:
        tokens = int(kv_cache_gib * 2**30) // per_token
    else:
        tokens = shape.num_samples * -(-shape.max_model_len // block_size) * block_size
        if shape.device.type == "cuda":
            tokens = min(tokens, int(KV_FRACTION * torch.cuda.mem_get_info(shape.device)[0]) // per_token)
    return max(tokens, shape.max_model_len)


def native_generate_fn(
    model: GPTModel, shape: GenShape, kv_cache_gib: float | None, block_size: int | None, report: GenResult
) -> tuple[GenerateFn, Callable]:
    """Colocated on `model` (already on the device in the benchmark dtype); CUDA graphs on CUDA, the
    compiled decode step on the CPU (compiled in the warmup run). Fills `report`'s KV fields after each
    run."""
    from rollout.engines.native.engine import DEFAULT_BLOCK_SIZE, NativeEngine

    block_size = block_size or DEFAULT_BLOCK_SIZE
    engine = NativeEngine(
        model=model,
        max_model_len=shape.max_model_len,
        max_num_seqs=shape.num_samples,
        cuda_graphs=True,
        compile_cpu=True,
        kv_cache_tokens=native_kv_cache_tokens(model.config, shape, kv_cache_gib, block_size),
        block_size=block_size,
    )
    generate = _engine_generate_fn(engine, shape)

    def generate_and_report(prompts: list[list[int]], new_tokens: int) -> int:
        new_tokens = generate(prompts, new_tokens)
        report.kv_reserved_bytes, report.kv_peak_bytes = engine.kv_cache_bytes, engine.kv_cache_peak_bytes
        report.preemptions = engine.num_preemptions
        return new_tokens

    return generate_and_report, engine.shutdown


def vllm_kv_cache_gib(config: TransformerConfig, shape: GenShape) -> float:
    """KV cache for the whole batch at full length, 25% + 64 MiB headroom for vLLM's block rounding."""
    return 1.25 * shape.unpaged_kv_bytes(config) / 2**30 + 1 / 16


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
    result: GenResult,
    build: Callable[[], tuple[GenerateFn, Callable]],
    prompts: list[list[int]],
    new_tokens: int,
    warmup_new_tokens: int,
) -> GenResult:
    """Build, one untimed warmup run (same prompts, warmup_new_tokens each), one timed run, into `result`.
    Any failure becomes a skipped row."""
    close: Callable = lambda: None  # noqa: E731
    try:
        generate, close = build()
        generate(prompts, warmup_new_tokens)
        start = time.perf_counter()
        result.new_tokens = generate(prompts, new_tokens)
        result.seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 -- a benchmark row, not a crash
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        result.skipped = f"{type(exc).__name__}: {first_line}"
        result.new_tokens = result.seconds = None
    finally:
        close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def unavailable(engine: str, shape: GenShape, config: TransformerConfig) -> str | None:
    """Why `engine` cannot run here, checked before building anything; None when it may."""
    device = shape.device
    if engine == "hf-static" and device.type != "cuda":
        return "CUDA only (transformers compiles the static-cache forward)"
    if engine in ("hf", "hf-static") and device.type == "cuda":
        need, free = shape.unpaged_kv_bytes(config), torch.cuda.mem_get_info(device)[0]
        if need > KV_FRACTION * free:
            return f"its KV cache ({need / 1e9:.0f} GB for {shape.num_samples} x {shape.max_model_len}) exceeds the free {free / 1e9:.0f} GB"
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception as exc:  # noqa: BLE001 -- ImportError or a broken install alike
            return f"vllm does not import: {type(exc).__name__}: {str(exc)[:120]}"
    return None


def run_generate_bench(
    config: TransformerConfig,
    shape: GenShape,
    engines: Sequence[str],
    workdir: Path,
    seed: int = 0,
    kv_cache_gib: float | None = None,
    warmup_new_tokens: int | None = None,
    block_size: int | None = None,
) -> list[GenResult]:
    """One row per engine, in ENGINES order (vLLM last: in-process it reseeds and pins threads).
    warmup_new_tokens: of the untimed run (default: the shape's; shorter runs leave the CUDA graphs of
    the longer kv buckets to be captured in the timed run)."""
    model = build_random_model(config, seed)
    model_dir = save_checkpoint(model.to(shape.dtype), workdir / "hf")
    model = model.to(shape.device)
    prompts = random_prompts(shape.batch, shape.prompt_len, config.vocab_size, seed)
    results = []
    for engine in (e for e in ENGINES if e in engines):
        result = GenResult(ROW_NAMES[engine])
        builders = {
            "hf": lambda: hf_generate_fn(model_dir, shape, static_cache=False),
            "hf-static": lambda: hf_generate_fn(model_dir, shape, static_cache=True),
            "native": lambda: native_generate_fn(model, shape, kv_cache_gib, block_size, result),  # noqa: B023
            "vllm": lambda: vllm_generate_fn(model_dir, shape, config),
        }
        result.skipped = unavailable(engine, shape, config)
        if not result.skipped:
            warmup = warmup_new_tokens or shape.new_tokens
            time_engine(result, builders[engine], prompts, shape.new_tokens, warmup)
        results.append(result)
    return results


def format_table(
    results: list[GenResult], baseline: str = BASELINE, unpaged_kv_bytes: int | None = None
) -> str:
    """One row per implementation; KV columns (GB) where the engine reports them. unpaged_kv_bytes: a
    line above the table saying what one max_model_len slot per sample would reserve."""
    base = next((r for r in results if r.name == baseline and r.tokens_per_s), None)
    header = f"{'implementation':<28} {'tokens/s':>12} {'seconds':>9} {'new tokens':>11} {'vs base':>8}"
    lines = []
    if unpaged_kv_bytes is not None:
        lines.append(
            f"an unpaged KV cache (a max_model_len slot per sample) reserves {unpaged_kv_bytes / 1e9:.3f} GB"
        )
    lines.append(header + f" {'KV peak GB':>10} {'KV rsvd GB':>10} {'preempted':>9}")
    for r in results:
        if r.tokens_per_s is None:
            lines.append(f"{r.name:<28} {'skipped':>12}  {r.skipped}")
            continue
        ratio = f"{r.tokens_per_s / base.tokens_per_s:7.2f}x" if base else "       -"
        line = f"{r.name:<28} {r.tokens_per_s:12,.0f} {r.seconds:9.3f} {r.new_tokens:11,d} {ratio}"
        if r.kv_reserved_bytes is not None:
            line += f" {r.kv_peak_bytes / 1e9:10.3f} {r.kv_reserved_bytes / 1e9:10.3f} {r.preemptions:9d}"
        lines.append(line)
    return "\n".join(lines)
