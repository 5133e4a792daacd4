"""`rl bench refit`: time to push a full set of trained weights into a generation engine.

The source is what a trainer hands over: the HF-named stream `core.bridge.export_hf_weights` makes
of a GPTModel on the device (fused q/k/v and gate/up split on the fly). Each row consumes that same
stream; GB is its size and GB/s is GB over the row's seconds.

Rows: the baseline is a plain `load_state_dict` of the stream into a transformers model on the same
device and dtype; `refit_engine` into the chosen engine (bucketed, as a trainer would); for the
native engine also `use_model`, the colocated path that binds the trainer's own parameters and
copies nothing (GB 0). Each row runs once untimed, then `repeats` timed runs, mean reported.

Transports (`transport`): "same-process" gives the rows above. "shm" and "process-group" instead time a
refit from this process into an engine hosted by a separate process (rollout/transport.py): the
receiver applies each refit with `receive_weights` and reports back, and a row's seconds run from
the start of `send` to that report (transfer + load, as in a disaggregated or Ray-actor setup). On
CUDA "shm" uses CUDA IPC slots and "process-group" NCCL; on the CPU shared files and gloo.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from core.bridge import export_hf_weights
from core.errors import InputError
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel
from rl.bench.generate import build_random_model, save_checkpoint, sync

BASELINE = "hf load_state_dict"
TRANSPORTS = ("same-process", "shm", "process-group")


def parse_transports(text: str) -> tuple[str, ...]:
    """ "shm, process-group" -> ("shm", "process-group"); InputError naming unknown ones."""
    transports = tuple(t.strip() for t in text.split(",") if t.strip())
    if unknown := [t for t in transports if t not in TRANSPORTS]:
        raise InputError(f"--transport: unknown {', '.join(unknown)}; choose from {', '.join(TRANSPORTS)}")
    return transports


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

    # A tied output head is one tensor in the stream (the embedding); HF lists it under both names.
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()

    def step(_: int) -> None:
        result = hf.load_state_dict(dict(export_hf_weights(model, model.config)), strict=False)
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise RuntimeError(f"HF state dict mismatch: {result}")

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


def _engine_process(
    model_dir: str,
    engine: str,
    device: str,
    dtype: torch.dtype,
    transport: str,
    address: object,
    refits: int,
    reports: object,
) -> None:
    """Host an engine in its own process and apply `refits` refits from `address`, reporting each."""
    from rollout.transport import ProcessGroupReceiver, SharedMemoryReceiver, receive_weights

    try:
        if engine == "native":
            from rollout.engines.native.engine import NativeEngine

            target = NativeEngine(
                model_dir=model_dir, max_model_len=64, max_num_seqs=1, device=device, dtype=dtype
            )
        else:
            from rollout.engines.vllm_engine import VLLMEngine

            vllm_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
            target = VLLMEngine(model_dir, dtype=vllm_dtype, max_model_len=64, kv_cache_gib=1 / 16)
        if transport == "shm":
            receiver = SharedMemoryReceiver(address, device=device)  # type: ignore[arg-type]
        else:
            receiver = ProcessGroupReceiver(address, device=device)  # type: ignore[arg-type]
        reports.put("ready")  # type: ignore[attr-defined]
        for _ in range(refits):
            reports.put(receive_weights(target, receiver))  # type: ignore[attr-defined]
        receiver.close()
        target.shutdown()
    except BaseException as exc:  # noqa: BLE001 -- reported to the benchmark process
        reports.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def _expect_report(reports: object, expected: object) -> None:
    got = reports.get(timeout=600)  # type: ignore[attr-defined]
    if got != expected:
        raise RuntimeError(f"engine process: {got}")


def transport_rows(
    model: GPTModel, model_dir: Path, engine: str, transport: str, bucket_bytes: int, repeats: int
) -> list[RefitResult]:
    """Refit an engine in another process over `transport` (see the module docstring)."""
    import multiprocessing as mp

    from rollout.transport import ProcessGroupSender, SharedMemorySender, WeightSender

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    sender: WeightSender
    if transport == "shm":
        sender = SharedMemorySender(
            slot_bytes=min(bucket_bytes, 64 << 20), device=device, bucket_bytes=bucket_bytes
        )
        label = "CUDA IPC" if device.type == "cuda" else "/dev/shm"
    else:
        backend = "nccl" if device.type == "cuda" else "gloo"
        sender, label = ProcessGroupSender(backend=backend, bucket_bytes=bucket_bytes), backend
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    args = (str(model_dir), engine, str(device), dtype, transport, sender.address, repeats + 1, reports)
    proc = ctx.Process(target=_engine_process, args=args, daemon=True)
    proc.start()
    try:
        _expect_report(reports, "ready")

        def step(i: int) -> None:
            sender.send(export_hf_weights(model, model.config), i + 1)
            _expect_report(reports, i + 1)

        seconds = time_repeats(step, device, repeats)
    finally:
        sender.close()
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    name = f"{engine} {transport} {label} ({bucket_bytes >> 20} MiB)"
    return [RefitResult(name, seconds, stream_bytes(model))]


def run_refit_bench(
    config: TransformerConfig,
    engine: str,
    device: torch.device,
    dtype: torch.dtype,
    bucket_bytes: int,
    workdir: Path,
    repeats: int = 3,
    transports: tuple[str, ...] = ("same-process",),
) -> list[RefitResult]:
    """Rows: the baseline, then per transport ("same-process" gives the in-process engine rows)."""
    model = build_random_model(config).to(dtype)
    model_dir = save_checkpoint(model, workdir / "hf")
    model = model.to(device)
    results = _guarded(BASELINE, lambda: [hf_load_state_dict_row(model, model_dir, device, repeats)])
    for transport in transports:
        if transport == "same-process" and engine == "native":
            results += _guarded("native", lambda: native_rows(model, model_dir, bucket_bytes, repeats))
        elif transport == "same-process":
            results += _guarded("vLLM", lambda: vllm_rows(model, model_dir, bucket_bytes, repeats))
        else:
            rows = partial(transport_rows, model, model_dir, engine, transport, bucket_bytes, repeats)
            results += _guarded(f"{engine} {transport}", rows)
    return results


def format_table(results: list[RefitResult], baseline: str = BASELINE) -> str:
    base = next((r for r in results if r.name == baseline and r.seconds), None)
    lines = [f"{'implementation':<38} {'seconds':>10} {'GB':>8} {'GB/s':>9} {'vs base':>8}"]
    for r in results:
        if r.seconds is None:
            lines.append(f"{r.name:<38} {'skipped':>10}  {r.skipped}")
            continue
        ratio = f"{base.seconds / r.seconds:7.2f}x" if base else "       "
        gb_per_s = f"{r.gb_per_s:9.2f}" if r.gb_per_s else f"{'-':>9}"
        lines.append(f"{r.name:<38} {r.seconds:10.4g} {r.num_bytes / 1e9:8.4f} {gb_per_s} {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m rl.bench.refit ARGS` is `rl bench refit ARGS`."""
    import sys

    from rl.cli import main as rl_main

    return rl_main(["bench", "refit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
