"""`rl pretrain` end to end on the CPU: falling loss, run-directory contents, HF export parity, and resume
after SIGKILL giving exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_pretrain import FAST, ROOT, TINY

from algorithms.pretrain import PretrainConfig, Trainer, run_pretrain
from core.utils.metrics import read_metrics
from rl.config import load_config


def rl_pretrain(run_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rl.cli", "pretrain", str(TINY), *FAST, f"run.dir={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(run_dir: Path) -> list[tuple[int, float, float, float]]:
    return [(r["step"], r["train/loss"], r["train/grad_norm"], r["train/lr"]) for r in read_metrics(run_dir)]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    steps = ["train.max_steps=12", "train.save_every=3"]
    reference = tmp_path / "reference"
    finish(rl_pretrain(reference, *steps))

    killed = tmp_path / "killed"
    proc = rl_pretrain(killed, *steps)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_6").exists():  # killed mid-run, after two checkpoints
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "hf").exists()
    finish(rl_pretrain(killed, *steps))  # same command: resumes from the newest checkpoint

    assert losses(killed) == losses(reference)  # bitwise: model, optimizer, scheduler, RNG, data position
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 13))
    ref_final = torch.load(reference / "checkpoints/step_12/trainer.pt", weights_only=True)
    assert ref_final["data"]["consumed_samples"] == 12 * 2 * 8


@pytest.mark.slow
def test_run_directory_export_and_falling_loss(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(
        PretrainConfig, TINY, [*FAST, f"run.dir={run_dir}", "train.max_steps=30", "optim.lr=3e-3"]
    )
    run_pretrain(cfg)
    rows = read_metrics(run_dir)
    first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
    assert last < 0.7 * first, (first, last)
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "eval/accuracy",
        "eval/loss",
    ):
        assert key in rows[-1], key
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.png").is_file()
    assert any((run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_30"]
    assert load_config(PretrainConfig, run_dir / "config.yaml") == cfg

    # The HF export loads in transformers and gives our model's logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = Trainer(cfg)  # resumes the finished run: the trained weights
    model = trainer.engine.chunks[0]
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = torch.tensor([tok("12+34=46")["input_ids"], tok("98+76=17")["input_ids"]])
    with torch.no_grad():
        ours = model.eval()(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.slow
def test_bad_paths_exit_2_and_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = rl_pretrain(run_dir, "model.init_from=/nonexistent/model")
    out = finish_code(proc, 2)
    assert out.strip().splitlines()[-1].startswith("error: model.init_from: /nonexistent/model not found")
    assert not run_dir.exists()
    proc = rl_pretrain(
        run_dir, "data.synthetic=null", "data.datasets=[{path: /nope/corpus}]", "data.tokenizer=/nope/tok"
    )
    assert "tokenizer path not found: /nope/tok" in finish_code(proc, 2)
    assert not run_dir.exists()


def finish_code(proc: subprocess.Popen, code: int) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out[-3000:]
    return out


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_metrics_rows_are_json(tmp_path):
    from core.utils.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log(step, {"train/loss": torch.tensor(1.0 / step)})
    log.close()
    log = MetricsLogger(tmp_path, resume_step=3, tensorboard=False)  # resumed at 3: rows 4, 5 are dropped
    log.log(4, {"train/loss": 0.5})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["train/loss"] == 0.5


@pytest.mark.slow
def test_compiled_layers_train_like_eager(tmp_path):
    """train.compile=true (every transformer layer through Inductor) gives the eager run's losses and
    gradient norms step for step (fp32, CPU), and the checkpoint keeps the eager parameter names."""
    from torch._dynamo.utils import counters

    curves, graphs = {}, {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile_{compiled}"
        overrides = [
            *FAST,
            f"run.dir={run_dir}",
            "train.max_steps=4",
            f"train.compile={str(compiled).lower()}",
        ]
        counters.clear()
        run_pretrain(load_config(PretrainConfig, TINY, overrides))
        graphs[compiled] = counters["stats"]["unique_graphs"]
        curves[compiled] = [(r["train/loss"], r["train/grad_norm"]) for r in read_metrics(run_dir)]
    assert graphs[False] == 0 and graphs[True] > 0, graphs  # Dynamo really compiled the layers
    assert len(curves[True]) == 4
    for (loss_e, norm_e), (loss_c, norm_c) in zip(curves[False], curves[True], strict=True):
        assert abs(loss_c - loss_e) <= 1e-4 * abs(loss_e), (curves[False], curves[True])
        assert abs(norm_c - norm_e) <= 1e-3 * abs(norm_e), (curves[False], curves[True])
    assert (tmp_path / "compile_True/hf/model.safetensors").is_file()


def test_reset_attention_mask_false_trains_with_plain_causal_attention(tmp_path):
    """data.reset_attention_mask=false: the step's loss is that of the model run on the packed rows with plain
    causal attention and positions 0..T-1 (no per-document mask), and it differs from the default's."""
    import torch.nn.functional as F

    def trainer(reset: bool) -> Trainer:
        overrides = [
            *FAST,
            f"run.dir={tmp_path / str(reset)}",
            f"data.reset_attention_mask={str(reset).lower()}",
        ]
        return Trainer(load_config(PretrainConfig, TINY, overrides))

    plain = trainer(False)
    twin = trainer(False)  # same seed: the same batches, read here by hand
    mbs = [next(twin.batches) for _ in range(twin.grad_accum)]
    model = twin.engine.chunks[0]
    with torch.no_grad():
        total = sum(
            (
                F.cross_entropy(
                    model(mb["input_ids"]).flatten(0, 1), mb["labels"].flatten(), reduction="none"
                )
                * mb["loss_mask"].flatten()
            ).sum()
            for mb in mbs
        )
    want = float(total / sum(mb["loss_mask"].sum() for mb in mbs))
    got = plain.step()["train/loss"]
    assert abs(got - want) < 1e-5 * want, (got, want)
    assert (
        abs(trainer(True).step()["train/loss"] - got) > 1e-4
    )  # per-document masking is a different model input
