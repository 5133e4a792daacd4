"""Time the split-K decode kernel over (CHUNK, BLOCK_N, warps, stages) at the llama_1b decode shape.

python scripts/tune_decode_attention.py [--length 256] [--kv-len 384]; prints us and TB/s per setting.
"""

import argparse
import itertools

import torch

from rollout.engines.native import decode_attention as fd

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=256, help="keys each row reads")
p.add_argument("--kv-len", type=int, default=384, help="grid bucket")
p.add_argument("--page", type=int, default=16, help="KV block size (the engine's block_size)")
p.add_argument("--only-current", action="store_true", help="time the module's current setting only")
a = p.parse_args()
b, n_heads, n_kv, d, max_len = 256, 16, 16, 128, 384
page = a.page  # each row owns consecutive blocks
k = torch.randn(1 + b * max_len // page, n_kv, page, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
table = torch.arange(1, 1 + b * max_len // page, device="cuda", dtype=torch.int32).view(b, -1)
q = torch.randn(b, n_heads, d, device="cuda", dtype=torch.bfloat16)
lengths = torch.full((b,), a.length, device="cuda")
nbytes = 2 * b * n_kv * a.length * d * 2
print(f"K/V bytes read {nbytes / 1e6:.0f} MB")
results = []
settings = itertools.product((128, 256, 512), (32, 64, 128), (4, 8), (2, 3, 4))
if a.only_current:
    settings = [(fd.CHUNK, fd.BLOCK_N, fd.NUM_WARPS, fd.NUM_STAGES)]
for chunk, block, warps, stages in settings:
    if block > chunk:
        continue
    fd.CHUNK, fd.BLOCK_N, fd.NUM_WARPS, fd.NUM_STAGES = chunk, block, warps, stages
    try:
        fd.decode_attention(q, k, v, table, lengths, a.kv_len)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fd.decode_attention(q, k, v, table, lengths, a.kv_len)
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) / 50 * 1e3
        results.append((us, chunk, block, warps, stages))
        print(
            f"chunk {chunk:4d} block {block:4d} warps {warps} stages {stages}: {us:8.1f} us {nbytes / us / 1e6:5.2f} TB/s"
        )
    except Exception as e:  # noqa: BLE001
        print(chunk, block, warps, stages, "failed", str(e)[:80])
for us, *cfg in sorted(results)[:5]:
    print("best", cfg, f"{us:.1f} us {nbytes / us / 1e6:.2f} TB/s")
