"""fp16 in `rl pretrain` (single process, in-process Trainer): fp16 parameters with fp32 master weights and main
grads, the DynamicGradScaler around them.

One run checks the behaviour a user relies on: an overflowing step (the scale forced to 2**60, far past fp16's
65504 in the logits' gradient) is skipped (no update of the fp32 masters, no Adam step) and the scale backs off;
clean steps train (the loss falls), the scale grows after loss_scale_window clean steps, metrics log loss_scale
and skipped_steps, and a resumed run restores the scaler from the checkpoint. CPU fp16 matmuls work in
torch >= 2.x (slowly; the model is tiny).
"""

from __future__ import annotations

from pathlib import Path

import torch

from algorithms.pretrain import PretrainConfig, Trainer
from core.utils.metrics import read_metrics
from rl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain_tiny.yaml"
STEPS, WINDOW = 8, 3
FAST = [
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.num_kv_heads=1",
    "model.ffn_hidden_size=128",
    "model.num_layers=2",
    "data.seq_len=32",
    "data.synthetic.n_train=1000",
    "data.synthetic.n_eval=10",
    "eval.num_problems=5",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    f"train.save_every={STEPS}",
    f"train.max_steps={STEPS}",
    "train.progress_bar=false",
    "train.device=cpu",
    "optim.warmup_steps=1",
    "precision.dtype=fp16",
    "precision.initial_loss_scale=1024",
    f"precision.loss_scale_window={WINDOW}",
]


def _masters(trainer: Trainer) -> list[torch.Tensor]:
    return [s.master.detach().clone() for s in trainer.engine.optimizer.shards]


def test_fp16_skips_overflow_backs_off_trains_and_resumes(tmp_path):
    cfg = load_config(PretrainConfig, TINY, [*FAST, f"run.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    engine, scaler = trainer.engine, trainer.engine.grad_scaler
    assert scaler is not None and next(engine.chunks[0].parameters()).dtype == torch.float16
    assert all(s.master.dtype == torch.float32 for s in engine.optimizer.shards)

    before = _masters(trainer)
    scaler.scale = 2.0**60  # forced overflow: inf/nan in the fp16 gradients
    first = trainer.advance()
    assert first["train/skipped_steps"] == 1 and first["train/loss_scale"] == 2.0**60
    assert "train/grad_norm" not in first
    assert scaler.scale == 2.0**59  # backed off
    assert all(torch.equal(a, b) for a, b in zip(before, _masters(trainer), strict=True))  # no update
    assert not any(engine.optimizer.state[s.master] for s in engine.optimizer.shards)  # no Adam step either

    scaler.scale = 1024.0
    trainer.fit()  # steps 2..8, saves the checkpoint at step 8
    rows = read_metrics(tmp_path / "run")
    assert [r["train/skipped_steps"] for r in rows] == [1] * (STEPS - 1)  # nothing overflowed since
    assert [r["train/loss_scale"] for r in rows][: WINDOW + 1] == [1024.0] * WINDOW + [2048.0]
    losses = [r["train/loss"] for r in rows]
    assert losses[-1] < first["train/loss"] - 0.5, (first["train/loss"], losses)
    assert all(torch.isfinite(torch.tensor(r["train/grad_norm"])) for r in rows)

    resumed = Trainer(cfg)  # from checkpoints/step_8
    assert resumed.step_count == STEPS and resumed.skipped_steps == 1
    assert resumed.engine.grad_scaler.state_dict() == scaler.state_dict()
