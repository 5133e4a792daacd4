"""`rl bench refit`: time to push a full set of trained weights into a generation engine.

The source is what a trainer hands over: the HF-named stream `core.bridge.export_hf_weights` makes
of a GPTModel on the device (fused q/k/v and gate/up split on the fly). Each row consumes that same
stream; GB is its size and GB/s is GB over the row's seconds.

Rows: the baseline is a plain `load_state_dict` of the stream into a transformers model on the same
device and dtype; `refit_engine` into the chosen engine (bucketed, as a trainer would); for the
native engine also `use_model`, the colocated path that binds the trainer's own parameters and
copies nothing (GB 0). Each row runs once untimed, then `repeats` timed runs, mean reported.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.bridge import export_hf_weights
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel
from rl.bench.generate import build_random_model, save_checkpoint, sync

BASELINE = "hf load_state_dict"


@dataclass
class RefitResult:
    name: str
    seconds: float | None = None
    num_bytes: int = 0
    skipped: str | None = None

    @property
    def gb_per_s(self) -> float | None:
        return self.num_bytes / 1e9 / self.seconds if self.seconds and self.num_bytes else None


def stream_bytes(model: GPTModel) -> int:
    return sum(t.numel() * t.element_size() for _, t in export_hf_weights(model, model.config))


def time_repeats(step: Callable[[int], None], device: torch.device, repeats: int) -> float:
    """Mean seconds of step(i) for i in 1..repeats, after the untimed step(0)."""
    step(0)
    sync(device)
    start = time.perf_counter()
    for i in range(1, repeats + 1):
        step(i)
    sync(device)
    return (time.perf_counter() - start) / repeats


def hf_load_state_dict_row(
    model: GPTModel, model_dir: Path, device: torch.device, repeats: int
) -> RefitResult:
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)

    def step(_: int) -> None:
        hf.load_state_dict(dict(export_hf_weights(model, model.config)), strict=True)

    seconds = time_repeats(step, device, repeats)
    return RefitResult(BASELINE, seconds, stream_bytes(model))


def native_rows(model: GPTModel, model_dir: Path, bucket_bytes: int, repeats: int) -> list[RefitResult]:
    """refit_engine into an engine that owns a copy (separate trainer and engine weights on one
    device), then use_model on an engine colocated with the trainer's model."""
    from rollout.engines.native.engine import NativeEngine
    from rollout.refit import refit_engine

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    num_bytes = stream_bytes(model)
    engine = NativeEngine(model_dir=model_dir, max_model_len=64, max_num_seqs=1, device=device, dtype=dtype)
    try:
        seconds = time_repeats(
            lambda i: refit_engine(engine, export_hf_weights(model, model.config), i + 1, bucket_bytes),
            device,
            repeats,
        )
    finally:
        engine.shutdown()
    refit = RefitResult(f"native refit_engine ({bucket_bytes >> 20} MiB)", seconds, num_bytes)
    colocated = NativeEngine(model=model, max_model_len=64, max_num_seqs=1)
    try:
        seconds = time_repeats(lambda i: colocated.use_model(model, version=i + 1), device, repeats)
    finally:
        colocated.shutdown()
    return [refit, RefitResult("native use_model (no copy)", seconds, 0)]


def vllm_rows(model: GPTModel, model_dir: Path, bucket_bytes: int, repeats: int) -> list[RefitResult]:
    from rollout.engines.vllm_engine import VLLMEngine
    from rollout.refit import refit_engine

    param = next(model.parameters())
    engine = VLLMEngine(
        model_dir,
        dtype="bfloat16" if param.dtype == torch.bfloat16 else "float32",
        max_model_len=64,
        kv_cache_gib=1 / 16,
        in_process=True,
    )
    try:
        seconds = time_repeats(
            lambda i: refit_engine(engine, export_hf_weights(model, model.config), i + 1, bucket_bytes),
            param.device,
            repeats,
        )
    finally:
        engine.shutdown()
    return [RefitResult(f"vLLM refit_engine ({bucket_bytes >> 20} MiB)", seconds, stream_bytes(model))]


def _guarded(name: str, rows: Callable[[], list[RefitResult]]) -> list[RefitResult]:
    try:
        return rows()
    except Exception as exc:  # noqa: BLE001 -- a benchmark row, not a crash
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        return [RefitResult(name, skipped=f"{type(exc).__name__}: {first_line}")]
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_refit_bench(
    config: TransformerConfig,
    engine: str,
    device: torch.device,
    dtype: torch.dtype,
    bucket_bytes: int,
    workdir: Path,
    repeats: int = 3,
) -> list[RefitResult]:
    model = build_random_model(config).to(dtype)
    model_dir = save_checkpoint(model, workdir / "hf")
    model = model.to(device)
    results = _guarded(BASELINE, lambda: [hf_load_state_dict_row(model, model_dir, device, repeats)])
    if engine == "native":
        results += _guarded("native", lambda: native_rows(model, model_dir, bucket_bytes, repeats))
    else:
        results += _guarded("vLLM", lambda: vllm_rows(model, model_dir, bucket_bytes, repeats))
    return results


def format_table(results: list[RefitResult], baseline: str = BASELINE) -> str:
    base = next((r for r in results if r.name == baseline and r.seconds), None)
    lines = [f"{'implementation':<34} {'seconds':>10} {'GB':>8} {'GB/s':>9} {'vs base':>8}"]
    for r in results:
        if r.seconds is None:
            lines.append(f"{r.name:<34} {'skipped':>10}  {r.skipped}")
            continue
        ratio = f"{base.seconds / r.seconds:7.2f}x" if base else "       "
        gb_per_s = f"{r.gb_per_s:9.2f}" if r.gb_per_s else f"{'-':>9}"
        lines.append(f"{r.name:<34} {r.seconds:10.4g} {r.num_bytes / 1e9:8.4f} {gb_per_s} {ratio}")
    return "\n".join(lines)
