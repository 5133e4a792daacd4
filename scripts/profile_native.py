"""Where the native engine's decode time goes on the GPU: wall time per phase and the top CUDA/CPU ops.

python scripts/profile_native.py [--batch 256] [--prompt-len 128] [--new-tokens 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from core.models import preset
from core.transformer.model import GPTModel
from rollout.engines.native.engine import NativeEngine
from rollout.types import GenerationRequest, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama_1b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    torch.manual_seed(0)
    model = GPTModel(preset(a.preset)).to("cuda", torch.bfloat16).eval()
    engine = NativeEngine(
        model=model, max_model_len=a.prompt_len + a.new_tokens, max_num_seqs=a.batch, cuda_graphs=True
    )
    prompts = torch.randint(0, model.config.vocab_size, (a.batch, a.prompt_len)).tolist()
    params = SamplingParams(max_tokens=a.new_tokens, ignore_eos=True, temperature=0.0, logprobs=False)
    reqs = [GenerationRequest(x, params) for x in prompts]
    engine.generate(reqs)  # warm-up: graphs captured, kernels compiled
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.generate(reqs)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    print(
        f"wall {wall:.3f}s  {a.batch * a.new_tokens / wall:,.0f} tok/s  {wall / a.new_tokens * 1e3:.2f} ms/step"
    )
    import cProfile
    import pstats

    prof_py = cProfile.Profile()
    prof_py.enable()
    engine.generate(reqs)
    torch.cuda.synchronize()
    prof_py.disable()
    pstats.Stats(prof_py).sort_stats("tottime").print_stats(22)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(reqs)
        torch.cuda.synchronize()
    table_cuda = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table_cuda)
    print(table_cpu)
    Path(a.out, "profile.txt").write_text(table_cuda + "\n\n" + table_cpu)


if __name__ == "__main__":
    main()
