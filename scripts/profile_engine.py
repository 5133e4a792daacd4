"""Where ModelEngine's training step loses time against the bare model (issue 15, item 1).

python scripts/profile_engine.py [--preset llama_1b] [--seq-len 2048] [--micro-batch-size 4] [--out DIR]
    [--docmask] [--compile]

For the bare GPTModel + fused AdamW step (what `rl bench train` times) and for ModelEngine's step (what
`rl pretrain` runs): mean step time, ModelEngine's phase split (forward_backward, finalize_grads,
optimizer_step, timed with a device sync after each), and the top CUDA kernels of two profiled steps.
--docmask gives every row 4 documents (segment_ids), as `rl pretrain` packs them by default.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from core.models import preset
from rl.bench.train import engine_step_fn, ours_step_fn


def segment_ids(batch: int, seq_len: int, docs: int, device: torch.device) -> torch.Tensor:
    """(B, T) ids of `docs` equal-length documents per row."""
    per = seq_len // docs
    return (
        (torch.arange(seq_len, device=device) // per).clamp(max=docs - 1).expand(batch, seq_len).contiguous()
    )


def timed(step, n: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def kernel_table(step, out: Path, name: str, rows: int = 25) -> str:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    trace = out / f"trace_{name}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama_1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--docmask", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default=".")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device("cuda"), torch.bfloat16
    config = preset(a.preset)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (a.micro_batch_size, a.seq_len + 1), generator=g).to(device)
    batch = (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    tokens = a.micro_batch_size * a.seq_len
    report = [f"{a.preset} seq {a.seq_len} mbs {a.micro_batch_size} docmask={a.docmask} compile={a.compile}"]

    step, model = ours_step_fn(config, batch, device, dtype, a.compile)
    for _ in range(3):
        step()
    s = timed(step, a.steps)
    report.append(f"bare   step {s * 1e3:8.1f} ms  {tokens / s:10,.0f} tokens/s")
    report.append(kernel_table(step, out, "bare"))
    del step, model
    torch.cuda.empty_cache()

    step, engine = engine_step_fn(config, batch, device, dtype, a.compile)
    if a.docmask:
        seg = segment_ids(a.micro_batch_size, a.seq_len, 4, device)
        engine_mb = {"input_ids": batch[0], "labels": batch[1], "segment_ids": seg}
        from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

        def loss_fn(logits, mb):
            loss_sum = vocab_parallel_cross_entropy(logits, mb["labels"], None).sum()
            return loss_sum / tokens, {"loss_sum": loss_sum.detach()}

        def step():
            engine.train_step([engine_mb], loss_fn, clip_grad=1.0)

    for _ in range(3):
        step()
    s = timed(step, a.steps)
    report.append(f"engine step {s * 1e3:8.1f} ms  {tokens / s:10,.0f} tokens/s")
    # phase split
    mb = engine_mb if a.docmask else {"input_ids": batch[0], "labels": batch[1]}
    from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    def lf(logits, m):
        loss_sum = vocab_parallel_cross_entropy(logits, m["labels"], None).sum()
        return loss_sum / tokens, {"loss_sum": loss_sum.detach()}

    phases = {"forward_backward": 0.0, "finalize_grads": 0.0, "optimizer_step": 0.0}
    for _ in range(a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.forward_backward([mb], lf)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        engine.finalize_grads()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        engine.optimizer_step(1.0)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        phases["forward_backward"] += t1 - t0
        phases["finalize_grads"] += t2 - t1
        phases["optimizer_step"] += t3 - t2
    report.append(
        "engine phases (ms): " + "  ".join(f"{k} {v / a.steps * 1e3:.1f}" for k, v in phases.items())
    )
    report.append(kernel_table(step, out, "engine"))
    text = "\n".join(report)
    print(text)
    (
        out / f"profile_engine{'_docmask' if a.docmask else ''}{'_compile' if a.compile else ''}.txt"
    ).write_text(text)


if __name__ == "__main__":
    main()
