"""Time the split-K decode kernel over (CHUNK, BLOCK_N, warps, stages) at the llama_1b decode shape."""

import itertools

import torch

from rollout.engines.native import decode_attention as fd

b, n_heads, n_kv, d, max_len, kv_len, length = 256, 16, 16, 128, 384, 512, 256
k = torch.randn(b, n_kv, max_len + 128, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
q = torch.randn(b, n_heads, d, device="cuda", dtype=torch.bfloat16)
lengths = torch.full((b,), length, device="cuda")
floor_us = 2 * b * n_kv * length * d * 2 / 4.8e12 * 1e6
print(f"bandwidth floor at 4.8 TB/s: {floor_us:.1f} us")
for chunk, block, warps, stages in itertools.product((128, 256, 512), (16, 32, 64), (2, 4, 8), (2, 3)):
    if block > chunk:
        continue
    fd.CHUNK, fd.BLOCK_N, fd.NUM_WARPS, fd.NUM_STAGES = chunk, block, warps, stages
    try:
        fd.decode_attention(q, k, v, lengths, kv_len)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fd.decode_attention(q, k, v, lengths, kv_len)
        end.record()
        torch.cuda.synchronize()
        print(
            f"chunk {chunk:4d} block {block:4d} warps {warps} stages {stages}: {start.elapsed_time(end) / 50 * 1e3:8.1f} us"
        )
    except Exception as e:  # noqa: BLE001
        print(chunk, block, warps, stages, "failed", str(e)[:80])
