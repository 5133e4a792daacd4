"""`rl pretrain` on several gloo ranks from the CLI: the loss curve of every layout matches the single-process
run, and a run resumed at another layout (checkpoint resharding) continues it exactly.

The model is a tiny Mixtral (2 experts, top-2) so that every layout also runs the MoE path (experts sharded
over ep, reduced over expert-data-parallel). With top_k = num_experts every token reaches every expert, so
the load-balancing loss is the constant E and its gradient vanishes: layouts that split tokens over ranks
(dp, cp), where each rank balances its own tokens, still reproduce the single process exactly. Real top-k
routing under ep is checked at gradient level in test_parallel_combos.py and test_expert_parallel.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.utils.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain_tiny.yaml"
FAST = [
    "model.arch=mixtral",
    "model.num_experts=2",
    "model.moe_top_k=2",
    "model.moe_ffn_hidden_size=64",
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=128",
    "model.num_layers=4",  # 2 chunks per stage at pp2 x vpp2
    "data.seq_len=32",  # divisible by 2 * cp
    "data.synthetic.n_train=1000",
    "data.synthetic.n_eval=20",
    "eval.num_problems=10",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=2",
    "train.progress_bar=false",
    "optim.warmup_steps=1",
]
# fp32 on CPU: tp and cp change the summation order inside matmuls and reductions (~1e-7 relative; cp runs
# the masked attention kernel), pp and dp do not change any arithmetic; 1e-5 absolute on a loss of ~4
# catches any wrong gradient within a step.
TOL = 1e-5


def rl_pretrain(run_dir: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "rl.cli", "pretrain", str(TINY), *FAST, f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    rl_pretrain(run_dir, "train.max_steps=4")
    return run_dir


def assert_same_curve(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) < TOL, f"step {step}: {a} vs single-process {b}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        # cp splits each sequence (load-balanced, evaluation rows padded to 2*cp); ep carved out of dp x cp.
        ["parallel.cp=2", "parallel.ep=2"],
        ["parallel.pp=2", "parallel.vpp=2"],
        # 8 ranks on 2 cores: every axis at once, ZeRO-1 sharding over dp inside each (tp, pp) slice.
        ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.distributed_optimizer=true"],
    ],
    ids=["cp2-ep2", "pp2-interleaved", "tp2-pp2-dp2-zero1"],
)
def test_layout_matches_single_process(tmp_path, reference, layout):
    want = curve(reference)
    run_dir = tmp_path / "run"
    rl_pretrain(run_dir, "train.max_steps=4", *layout)
    assert_same_curve(curve(run_dir), want)
    assert (run_dir / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_resume_at_another_layout(tmp_path, reference):
    """Saved at tp2 after 2 steps, resumed at dp2 (resharded checkpoint): steps 3-4 equal the reference."""
    run_dir = tmp_path / "run"
    rl_pretrain(run_dir, "train.max_steps=2", "parallel.tp=2")
    rl_pretrain(run_dir, "train.max_steps=4", "parallel.dp=2")
    assert_same_curve(curve(run_dir), curve(reference))


@pytest.mark.slow
def test_impossible_layout_exits_2(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "rl.cli",
        "pretrain",
        str(TINY),
        *FAST,
        f"run.dir={tmp_path / 'r'}",
        "parallel.tp=4",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "parallel.tp=4" in proc.stderr and "error:" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.cp=2", "data.seq_len=30"], "data.seq_len=30 is not divisible by 2 * parallel.cp = 4"),
        (["parallel.dp=2", "parallel.ep=4"], "parallel.ep=4 must divide dp*cp=2"),
        (["parallel.dp=4", "parallel.ep=4", "train.global_batch_size=32"], "num_experts=2 is not divisible"),
        (["model.arch=llama", "model.num_experts=0", "parallel.dp=2", "parallel.ep=2"], "set ep=1"),
        (["parallel.cp=2", "train.compile=true"], "train.compile=true needs parallel.cp = ep = 1"),
    ],
    ids=["cp-seq-len", "ep-dp-cp", "ep-experts", "ep-dense", "compile-cp"],
)
def test_cp_ep_layout_errors_say_what_to_change(tmp_path, overrides, message):
    """The checks rl pretrain runs before any rank starts (exit 2 with this message: see the test above)."""
    from algorithms.pretrain import PretrainConfig, validate_layout
    from core.errors import InputError
    from rl.config import load_config

    cfg = load_config(PretrainConfig, TINY, [*FAST, f"run.dir={tmp_path}", *overrides])
    with pytest.raises(InputError, match=re.escape(message)):
        validate_layout(cfg, cfg.model.transformer_config(64))
