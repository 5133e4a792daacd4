"""`rl bench train|...`: throughput benchmarks that print a table next to a baseline run in the same process."""

from __future__ import annotations

import argparse

HELP = """Benchmarks. Each prints a table: our implementation next to a baseline measured in the same
process on the same device (timings never live in unit tests)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput benchmarks (ours vs a baseline)", description=HELP)
    kinds = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    t = kinds.add_parser("train", help="training tokens/s and MFU: GPTModel vs transformers + torch")
    t.add_argument("--preset", default="llama_tiny", help="model preset (core.models.PRESETS), e.g. llama_1b")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--micro-batch-size", type=int, default=4)
    t.add_argument("--steps", type=int, default=5, help="timed steps")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    t.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    t.add_argument("--compile", action="store_true", help="torch.compile both models")
    t.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from core.models import preset
    from rl.bench.train import format_table, hf_step_fn, ours_step_fn, run_one

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    config = preset(args.preset)
    shape = dict(
        seq_len=args.seq_len,
        batch_size=args.micro_batch_size,
        device=device,
        dtype=dtype,
        compile_model=args.compile,
        warmup=args.warmup,
        steps=args.steps,
    )
    suffix = " +compile" if args.compile else ""
    results = [run_one(f"tandem GPTModel{suffix}", ours_step_fn, config, **shape)]
    if not args.no_baseline:
        results.append(run_one(f"transformers{suffix} (baseline)", hf_step_fn, config, **shape))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"train bench: {args.preset} seq {args.seq_len} x mbs {args.micro_batch_size}, {dtype_name}, {name}"
    )
    print(format_table(results, baseline=results[-1].name))
    return 0
