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
    t.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step in every row (rl pretrain: global batch / (mbs x dp))",
    )
    t.add_argument("--steps", type=int, default=5, help="timed steps")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    t.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    t.add_argument("--compile", action="store_true", help="torch.compile both models")
    t.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    t.add_argument(
        "--engine",
        action="store_true",
        help="also time ModelEngine (what rl pretrain runs: fp32 masters and grad buffer, clipping)",
    )
    t.add_argument(
        "--documents",
        type=int,
        default=0,
        help="pack this many documents per row (per-document attention, as rl pretrain does); no HF row",
    )
    t.add_argument(
        "--recompute",
        choices=["none", "selective", "full"],
        default="none",
        help="activation recompute of the ModelEngine row (train.recompute)",
    )
    t.set_defaults(func=run_train)
    _register_generate(kinds)
    _register_refit(kinds)
    _register_grpo(kinds)
    _register_checkpoint(kinds)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="llama_tiny", help="model preset (core.models.PRESETS), e.g. llama_1b")
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU"
    )


def _register_generate(kinds: argparse._SubParsersAction) -> None:
    g = kinds.add_parser(
        "generate",
        help="generation new tokens/s: native engine, vLLM vs HF generate",
        description="Generation of exactly --new-tokens per sample (EOS ignored; greedy unless --temperature) "
        "on random weights; "
        "baseline: transformers generate. Engines that cannot run here get a row saying why.",
    )
    _add_model_args(g)
    g.add_argument("--batch", type=int, default=32, help="prompts per run")
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument(
        "--engines",
        default="hf,hf-static,native,vllm",
        help="comma list of hf, hf-static (CUDA only), native, vllm",
    )
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--baseline", choices=["hf", "hf-static", "vllm"], default="hf", help="the 'vs base' row")
    g.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="native KV pool (default: every sample's full length, capped on CUDA at 80%% of free memory)",
    )
    g.add_argument(
        "--warmup-new-tokens", type=int, default=None, help="of the untimed run (default: --new-tokens)"
    )
    g.add_argument(
        "--block-size", type=int, default=None, help="native KV block size (default: the engine's)"
    )
    g.set_defaults(func=run_generate)


def _register_refit(kinds: argparse._SubParsersAction) -> None:
    r = kinds.add_parser(
        "refit",
        help="weight refit seconds and GB/s into an engine vs HF load_state_dict",
        description="Push the full HF-named weight stream of a GPTModel into an engine; baseline: "
        "load_state_dict of the same stream into a transformers model.",
    )
    _add_model_args(r)
    r.add_argument("--bucket-mb", type=int, default=256, help="refit bucket size in MiB")
    r.add_argument("--engine", choices=["native", "vllm"], default="native")
    r.add_argument("--repeats", type=int, default=3, help="timed refits after one untimed")
    r.add_argument(
        "--transport",
        default="same-process",
        help="comma list of same-process, shm, process-group (the last two refit an engine in another process)",
    )
    r.set_defaults(func=run_refit)


def _register_grpo(kinds: argparse._SubParsersAction) -> None:
    g = kinds.add_parser(
        "grpo",
        help="seconds per full GRPO step (generate, logprobs, reference, train, refit) vs TRL's GRPOTrainer",
        description="Full GRPO steps of the in-process loop (native engine on the policy's weights) on random "
        "weights of a preset, random prompts and random rewards, every sample exactly --new-tokens long; "
        "baseline: trl.GRPOTrainer on the same weights and work (a row saying why when trl is missing).",
    )
    _add_model_args(g)
    g.add_argument("--prompts", type=int, default=8, help="prompts per step")
    g.add_argument("--n", type=int, default=8, help="samples per prompt (the group)")
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--new-tokens", type=int, default=256, help="tokens per sample (EOS ignored)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--micro-batch-size", type=int, default=16, help="sequences per forward/backward (ours)")
    g.add_argument(
        "--kl-coef", type=float, default=0.04, help="KL to a frozen reference (TRL's beta); 0: none"
    )
    g.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    g.add_argument("--compile", action="store_true", help="torch.compile the policy's layers (ours)")
    g.add_argument("--no-baseline", action="store_true", help="skip TRL")
    g.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="instead: the synchronous loop vs rollout.asynchronous on a local Ray cluster (engines on a worker "
        "of their own, arithmetic task, CPU); uses --preset (default llama_tiny), --prompts, --n, --new-tokens "
        "(default 24 here), --micro-batch-size, --steps, --warmup (default 1 here), --max-staleness",
    )
    g.add_argument("--max-staleness", type=int, default=1, help="--async: rollout.asynchronous.max_staleness")
    g.set_defaults(func=run_grpo)


def run_grpo(args: argparse.Namespace) -> int:
    if args.asynchronous:
        return run_async_grpo(args)
    from core.models import preset
    from rl.bench.grpo import GRPOShape, format_table, run_grpo_bench

    device, dtype, label = _device_and_dtype(args)
    shape = GRPOShape(
        prompts=args.prompts,
        n=args.n,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        temperature=args.temperature,
        micro_batch_size=args.micro_batch_size,
        kl_coef=args.kl_coef,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        dtype=dtype,
        compile=args.compile,
    )
    results = run_grpo_bench(preset(args.preset), shape, baseline=not args.no_baseline)
    print(
        f"grpo bench: {args.preset}, {args.prompts} prompts x {args.n} samples x {args.new_tokens} new tokens "
        f"(prompt {args.prompt_len}), temperature {args.temperature}, kl {args.kl_coef}, {label}"
    )
    print(format_table(results))
    return 0


def run_async_grpo(args: argparse.Namespace) -> int:
    from rl.bench.async_grpo import AsyncShape, format_table, run_async_bench

    new_tokens = 24 if args.new_tokens == 256 else args.new_tokens  # 256: the GPU default of the TRL bench
    warmup = 1 if args.warmup == 2 else args.warmup
    shape = AsyncShape(
        preset=args.preset,
        prompts=args.prompts,
        n=args.n,
        new_tokens=new_tokens,
        micro_batch_size=args.micro_batch_size,
        steps=args.steps,
        warmup=warmup,
        max_staleness=args.max_staleness,
    )
    results = run_async_bench(shape)
    print(
        f"grpo bench --async: {args.preset}, {args.prompts} prompts x {args.n} samples x up to {new_tokens} "
        f"new tokens, Ray on this machine (policy and engine on workers of their own), cpu; median of "
        f"{args.steps} steps after {warmup}"
    )
    print(format_table(results))
    return 0


def _device_and_dtype(args: argparse.Namespace):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return device, dtype, f"{dtype_name}, {name}"


def run_generate(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from core.errors import InputError
    from core.models import preset
    from rl.bench.generate import BASELINES, ENGINES, GenShape, format_table, run_generate_bench

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise InputError(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    device, dtype, where = _device_and_dtype(args)
    shape = GenShape(
        args.batch, args.prompt_len, args.new_tokens, device, dtype, args.n, args.temperature, args.top_p
    )
    config = preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-gen-") as workdir:
        results = run_generate_bench(
            config,
            shape,
            engines,
            Path(workdir),
            kv_cache_gib=args.kv_cache_gib,
            warmup_new_tokens=args.warmup_new_tokens,
            block_size=args.block_size,
        )
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top-p {args.top_p}"
    print(
        f"generate bench: {args.preset} batch {args.batch} x n {args.n} x prompt {args.prompt_len} "
        f"+ {args.new_tokens} new tokens ({how}, EOS ignored), {where}"
    )
    print(format_table(results, BASELINES[args.baseline], shape.unpaged_kv_bytes(config)))
    return 0


def run_refit(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from core.models import preset
    from rl.bench.refit import format_table, parse_transports, run_refit_bench

    transports = parse_transports(args.transport)
    device, dtype, where = _device_and_dtype(args)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-refit-") as workdir:
        results = run_refit_bench(
            preset(args.preset),
            args.engine,
            device,
            dtype,
            args.bucket_mb << 20,
            Path(workdir),
            args.repeats,
            transports=transports,
        )
    print(f"refit bench: {args.preset}, {where}, mean of {args.repeats} after one untimed")
    print(format_table(results))
    return 0


def run_train(args: argparse.Namespace) -> int:
    import torch

    from core.errors import InputError
    from core.models import preset
    from rl.bench.train import engine_step_fn, format_table, hf_step_fn, ours_step_fn, run_one

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    config = preset(args.preset)
    if args.grad_accum < 1:
        raise InputError(f"--grad-accum must be >= 1, got {args.grad_accum}")
    shape = dict(
        seq_len=args.seq_len,
        batch_size=args.micro_batch_size,
        device=device,
        dtype=dtype,
        compile_model=args.compile,
        warmup=args.warmup,
        steps=args.steps,
        documents=args.documents,
        accum=args.grad_accum,
    )
    suffix = (" +compile" if args.compile else "") + (f" {args.documents} docs" if args.documents > 1 else "")
    results = [run_one(f"tandem GPTModel{suffix}", ours_step_fn, config, **shape)]
    if args.engine:
        extra = f" recompute={args.recompute}" if args.recompute != "none" else ""
        results.append(
            run_one(
                f"tandem ModelEngine{suffix}{extra}",
                engine_step_fn,
                config,
                **shape,
                recompute=args.recompute,
            )
        )
    if not args.no_baseline and args.documents <= 1:
        results.append(run_one(f"transformers{suffix} (baseline)", hf_step_fn, config, **shape))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    accum = f" x {args.grad_accum} micro-batches per step" if args.grad_accum > 1 else ""
    print(
        f"train bench: {args.preset} seq {args.seq_len} x mbs {args.micro_batch_size}{accum}, {dtype_name}, {name}"
    )
    baseline = results[-1].name if results[-1].name.endswith("(baseline)") else results[0].name
    print(format_table(results, baseline=baseline))  # vs transformers, else vs the bare GPTModel
    return 0


def _register_checkpoint(kinds: argparse._SubParsersAction) -> None:
    c = kinds.add_parser(
        "checkpoint",
        help="training-step stall of a checkpoint save: async (train.async_save) vs sync dcp.save",
        description="Save a ModelEngine of the preset (weights, fp32 masters, AdamW moments) through the "
        "checkpoint manager, sync then async, timing what the training step waits for.",
    )
    _add_model_args(c)
    c.add_argument("--repeats", type=int, default=3, help="timed saves per mode after one untimed")
    c.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    c.set_defaults(func=run_checkpoint)


def run_checkpoint(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from core.models import preset
    from rl.bench.checkpoint import format_table, run_checkpoint_bench

    device, dtype, where = _device_and_dtype(args)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-ckpt-", dir=args.dir) as workdir:
        results, size = run_checkpoint_bench(preset(args.preset), device, dtype, Path(workdir), args.repeats)
        print(f"checkpoint bench: {args.preset}, {where}, into {workdir}, mean of {args.repeats} saves")
    print(format_table(results, size))
    return 0
