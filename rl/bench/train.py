"""`rl bench train`: training throughput (tokens/s, MFU) of our GPTModel next to plain transformers + torch,
both measured in the same process on the same device, shapes and optimizer.

FLOPs per token follow the PaLM/Megatron accounting: 6 * (non-embedding params + output head) for the
matmuls plus 6 * num_layers * seq_len * hidden for causal attention scores and values (12*L*T*H halved by
the causal mask). Both rows use the same formula, so their ratio is the speed-up.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from core.utils.flops import flops_per_token, peak_flops  # noqa: F401  (re-exported for scripts)


@dataclass
class BenchResult:
    name: str
    tokens_per_s: float
    step_s: float
    mfu: float | None
    peak_mem_gib: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, device: torch.device, warmup: int, steps: int) -> float:
    """Mean seconds per step after `warmup` untimed steps."""
    for _ in range(warmup):
        step_fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def ours_step_fn(config, batch, device, dtype, compile_model: bool, recompute: str = "none", accum: int = 1):
    from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    from core.transformer.model import GPTModel

    model = GPTModel(config).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model
    input_ids, labels, segment_ids = batch

    def step():
        for _ in range(accum):
            logits = forward(input_ids, segment_ids=segment_ids)  # (B, T, V)
            loss = vocab_parallel_cross_entropy(logits, labels, None).mean() / accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def engine_step_fn(
    config, batch, device, dtype, compile_model: bool, recompute: str = "none", accum: int = 1
):
    """What `rl pretrain` runs on one device: ModelEngine with fp32 master weights and an fp32 gradient
    buffer (DDP hooks), the global-norm clip and AdamW on the masters; compile = per-layer compile."""
    from core.config import OptimConfig, ParallelConfig
    from core.engine import ModelEngine
    from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    from core.transformer.model import GPTModel

    full_state = GPTModel(config).state_dict()
    engine = ModelEngine(
        config,
        ParallelConfig(),
        OptimConfig(lr=1e-4, min_lr=1e-4),
        None,
        device,
        full_state,
        dtype,
        compile_layers=compile_model,
        recompute=recompute,
    )
    del full_state
    input_ids, labels, segment_ids = batch
    micro_batch = {"input_ids": input_ids, "labels": labels}
    if segment_ids is not None:
        micro_batch["segment_ids"] = segment_ids
    n_tokens = float(labels.numel() * accum)

    def loss_fn(logits, mb):
        loss_sum = vocab_parallel_cross_entropy(logits, mb["labels"], None).sum()
        return loss_sum / n_tokens, {"loss_sum": loss_sum.detach()}

    def step():
        return engine.train_step([micro_batch] * accum, loss_fn, clip_grad=1.0)  # StepResult

    return step, engine


def hf_step_fn(config, batch, device, dtype, compile_model: bool, recompute: str = "none", accum: int = 1):
    from transformers import AutoModelForCausalLM

    from core.models import infer_architecture

    arch = infer_architecture(config)
    hf_config = arch.hf_config_from(config)
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model
    input_ids, labels, segment_ids = batch
    if segment_ids is not None:
        raise ValueError("the transformers row has no packed-document attention: run it without --documents")

    def step():
        for _ in range(accum):
            logits = forward(input_ids=input_ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()) / accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def document_ids(batch_size: int, seq_len: int, documents: int, device: torch.device) -> torch.Tensor | None:
    """(B, T) segment ids of `documents` equal-length packed documents per row; None for 0 or 1."""
    if documents <= 1:
        return None
    per = -(-seq_len // documents)
    return (torch.arange(seq_len, device=device) // per).expand(batch_size, seq_len).contiguous()


def run_one(
    name,
    builder,
    config,
    seq_len,
    batch_size,
    device,
    dtype,
    compile_model,
    warmup,
    steps,
    documents: int = 0,
    recompute: str = "none",
    accum: int = 1,
) -> BenchResult:
    """documents > 1: every row packs that many documents (per-document attention, as rl pretrain packs);
    accum: micro-batches per optimizer step (gradient accumulation, as a global batch of accum x
    batch_size runs in rl pretrain)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=g).to(device)
    batch = (
        ids[:, :-1].contiguous(),
        ids[:, 1:].contiguous(),
        document_ids(batch_size, seq_len, documents, device),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, model = builder(config, batch, device, dtype, compile_model, recompute, accum)
    step_s = time_steps(step, device, warmup, steps)
    tokens_per_s = accum * batch_size * seq_len / step_s
    peak = peak_flops(device)
    mfu = tokens_per_s * flops_per_token(config, seq_len) / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return BenchResult(name, tokens_per_s, step_s, mfu, mem)


def format_table(results: list[BenchResult], baseline: str) -> str:
    base = next((r for r in results if r.name == baseline), None)
    lines = [
        f"{'implementation':<32} {'tokens/s':>12} {'step s':>9} {'MFU':>7} {'peak GiB':>9} {'vs base':>8}"
    ]
    for r in results:
        mfu = f"{100 * r.mfu:6.1f}%" if r.mfu is not None else "    n/a"
        mem = f"{r.peak_mem_gib:9.1f}" if r.peak_mem_gib is not None else "      n/a"
        ratio = f"{r.tokens_per_s / base.tokens_per_s:7.2f}x" if base else "       "
        lines.append(f"{r.name:<32} {r.tokens_per_s:12,.0f} {r.step_s:9.3f} {mfu} {mem} {ratio}")
    return "\n".join(lines)
