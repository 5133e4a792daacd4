"""The numerical fault policy every loop shares (algorithms/trainer.py StepGuard, ModelEngine.optimizer_step).

A step whose loss or gradient norm is not finite (injected here by making the logits NaN, as an overflowing
forward would) is skipped on every rank: no update of the fp32 masters or AdamW moments, gradients dropped,
the row logged with train/skipped_step = 1 and the running train/bad_steps; the run goes on and converges.
train.max_bad_steps bad steps in a row stop it (exit 3) naming the newest good checkpoint, which stays
loadable, and leave hf/ byte-identical. Checkpoints and hf/ are never written from non-finite weights, and a
bad step never replaces a good checkpoint. Loss spikes are logged and counted.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_pretrain import TINY, fast

from algorithms import engine_trainer
from algorithms.pretrain import PretrainConfig, PretrainTrainer
from algorithms.trainer import RunDiverged, StepGuard
from core.checkpoint.sharded import load_full_state
from core.config import TrainConfig
from core.utils.metrics import read_metrics
from rl.config import load_config

FAST = fast(**{"data.synthetic.n_eval": 10, "eval.num_problems": 5, "train.device": "cpu"})


def poison(monkeypatch: pytest.MonkeyPatch, steps: set[int], scale: float = float("nan")) -> None:
    """Steps (1-based) whose logits are multiplied by `scale` before the loss: NaN makes the loss and every
    gradient NaN (what an overflowing forward gives); a large finite scale makes a loss spike."""
    real_step, real_loss = PretrainTrainer.step, engine_trainer.next_token_loss

    def scaled_loss(tp_group, n_tokens):
        loss_fn = real_loss(tp_group, n_tokens)
        return lambda logits, mb: loss_fn(logits * scale, mb)

    def step(self: PretrainTrainer) -> dict[str, float]:
        if self.step_count + 1 not in steps:
            return real_step(self)
        with monkeypatch.context() as m:
            m.setattr(engine_trainer, "next_token_loss", scaled_loss)
            return real_step(self)

    monkeypatch.setattr(PretrainTrainer, "step", step)


def trainer(run_dir: Path, *overrides: str) -> PretrainTrainer:
    return PretrainTrainer(load_config(PretrainConfig, TINY, [*FAST, f"run.dir={run_dir}", *overrides]))


def optimizer_state(t: PretrainTrainer) -> list[torch.Tensor]:
    opt = t.engine.optimizer
    out = []
    for s in opt.shards:
        out.append(s.master.clone())
        out += [v.clone() for v in opt.state[s.master].values()]
    return out


def test_a_nan_step_is_skipped_and_the_run_goes_on_and_converges(tmp_path, monkeypatch):
    poison(monkeypatch, {3})
    t = trainer(tmp_path / "run", "train.max_steps=30", "train.save_every=10")
    first = t.advance()["train/loss"]
    t.advance()
    before = optimizer_state(t)
    bad = t.advance()
    assert bad["train/loss"] != bad["train/loss"] and bad["train/grad_norm"] != bad["train/grad_norm"]  # NaN
    assert bad["train/skipped_step"] == 1 and bad["train/bad_steps"] == 1
    after = optimizer_state(t)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # masters, moments, step
    assert all(not g.any() for g in t.engine.optimizer.main_grads())  # the NaN gradients are dropped
    assert all(torch.isfinite(p).all() for c in t.engine.chunks for p in c.parameters())

    t.fit()  # steps 4..30
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(4, 31))
    assert all(r["train/skipped_step"] == 0 and r["train/bad_steps"] == 1 for r in rows)
    assert rows[-1]["train/loss"] < first - 1.0, (first, rows[-1]["train/loss"])
    saved = torch.load(tmp_path / "run/checkpoints/step_30/trainer.pt", weights_only=False)
    assert saved["faults"]["bad_steps"] == 1 and saved["faults"]["in_a_row"] == 0
    assert trainer(tmp_path / "run", "train.max_steps=30").guard.bad_steps == 1  # resumed with the count


def test_bad_steps_in_a_row_stop_the_run_with_exit_3_keeping_the_good_checkpoint_and_hf(
    tmp_path, monkeypatch, capsys
):
    """Through the CLI: a finished run (hf/ exported) is resumed for more steps; steps 7.. are NaN. Steps 7
    and 8 are skipped and logged (even off the log cadence), step 9 is the third in a row: exit 3, one line
    naming checkpoints/step_6; nothing of steps 7-9 is saved, hf/ is untouched."""
    from rl.cli import main

    run_dir = tmp_path / "run"
    argv = ["pretrain", str(TINY), *FAST, f"run.dir={run_dir}", "train.save_every=1"]
    assert main([*argv, "train.max_steps=4"]) == 0
    hf_before = {p.name: p.read_bytes() for p in (run_dir / "hf").iterdir()}
    capsys.readouterr()

    poison(monkeypatch, set(range(7, 100)))
    assert main([*argv, "train.max_steps=20", "train.log_every=100"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.match(
        r"error: train/loss=nan at step 9, 3 bad steps in a row \(train.max_bad_steps=3\): the run diverged",
        err[0],
    ), err
    assert f"{run_dir}/checkpoints/step_6 is the newest good checkpoint" in err[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_5", "step_6"]
    assert {p.name: p.read_bytes() for p in (run_dir / "hf").iterdir()} == hf_before
    state = load_full_state(run_dir / "checkpoints/step_6/model")
    assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))
    bad_rows = [r for r in read_metrics(run_dir) if r["step"] > 6]
    assert [(r["step"], r["train/skipped_step"], r["train/bad_steps"]) for r in bad_rows] == [
        (7, 1, 1),
        (8, 1, 2),
        (9, 1, 3),
    ]


def test_fewer_bad_steps_in_a_row_than_the_limit_do_not_stop_the_run(tmp_path, monkeypatch):
    poison(monkeypatch, {2, 3, 5, 6})  # never 3 in a row
    t = trainer(tmp_path / "run", "train.max_steps=7")
    t.fit()
    rows = read_metrics(tmp_path / "run")
    assert [r["train/skipped_step"] for r in rows] == [0, 1, 1, 0, 1, 1, 0]
    assert rows[-1]["train/bad_steps"] == 4 and (tmp_path / "run/checkpoints/step_7").is_dir()


def test_a_bad_step_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    """keep_last=1, a save due at every step: the save due at bad step 3 waits for good step 4 (step_2
    stays until then), and the bad last step is not saved at all."""
    poison(monkeypatch, {3, 5})
    t = trainer(tmp_path / "run", "train.max_steps=5", "train.save_every=1", "train.keep_last=1")
    on_disk: dict[int, list[str]] = {}  # step saved -> the checkpoints there just before
    real_save = t.save

    def save():
        on_disk[t.step_count] = sorted(p.name for p in t.checkpoints.root.glob("step_*"))
        return real_save()

    t.save = save
    t.fit()
    assert on_disk == {1: [], 2: ["step_1"], 4: ["step_2"]}
    assert sorted(p.name for p in t.checkpoints.root.iterdir()) == ["step_4"]


def test_no_checkpoint_or_export_from_non_finite_weights(tmp_path):
    t = trainer(tmp_path / "run", "train.max_steps=4", "train.keep_last=1")
    t.advance()
    t.save()
    t.export()
    hf_before = {p.name: p.read_bytes() for p in (tmp_path / "run/hf").iterdir()}
    t.advance()
    with torch.no_grad():
        next(t.engine.chunks[0].parameters())[0, 0] = float("inf")  # e.g. an update that overflowed
    with pytest.raises(RunDiverged, match=r"not finite at step 2: not saved.*step_1 is the newest good"):
        t.save()
    with pytest.raises(RunDiverged, match="hf/ not exported"):
        t.export()
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step_1"]  # not pruned
    assert {p.name: p.read_bytes() for p in (tmp_path / "run/hf").iterdir()} == hf_before
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_loss_spikes_are_logged_counted_and_optionally_bad():
    def guard(**kw) -> StepGuard:
        return StepGuard(TrainConfig(loss_spike_factor=2.0, loss_spike_window=3, **kw))

    g = guard()
    rows = [{"train/loss": v} for v in (4.0, 3.0, 3.5, 6.9, 7.1, 3.0)]
    for r in rows:
        assert not g.judge(r)  # logged, not bad
    # 6.9 < 2 x median(4, 3, 3.5) = 7; 7.1 > 2 x median(3, 3.5, 6.9) = 7; nothing before a full window
    assert [r["train/loss_spike"] for r in rows] == [0, 0, 0, 0, 1, 0]
    assert rows[-1]["train/loss_spikes"] == 1 and rows[-1]["train/bad_steps"] == 0

    strict = guard(loss_spike_is_bad=True, max_bad_steps=2)
    for v in (1.0, 1.0, 1.0, 5.0):
        bad = strict.judge({"train/loss": v})
    assert bad and strict.in_a_row == 1 and not strict.diverged and "spike" in strict.reason
    assert strict.judge({"train/loss": 9.0}) and strict.diverged  # 9 > 2 x median(1, 1, 5)
    restored = guard(loss_spike_is_bad=True, max_bad_steps=2)
    restored.load_state_dict(strict.state_dict())
    assert restored.state_dict() == strict.state_dict()

    off = StepGuard(TrainConfig())
    row = {"train/loss": 1e9}
    assert not off.judge(row) and "train/loss_spike" not in row


def test_a_loss_spike_in_a_run_is_logged_and_the_update_kept(tmp_path, monkeypatch):
    poison(monkeypatch, {7}, scale=300.0)  # peaked logits: a finite loss many times the running median
    t = trainer(
        tmp_path / "run", "train.max_steps=8", "train.loss_spike_factor=3", "train.loss_spike_window=4"
    )
    t.fit()
    rows = read_metrics(tmp_path / "run")
    assert [r["train/loss_spike"] for r in rows] == [0] * 6 + [1, 0], str([r["train/loss"] for r in rows])
    assert rows[-1]["train/loss_spikes"] == 1 and rows[-1]["train/bad_steps"] == 0


# ---- every rank decides alike ----------------------------------------------------------------------------


def _one_rank_nan_loss(rank: int, world_size: int) -> dict[str, float]:
    """dp=2, ZeRO-1: rank 1's loss_sum metric is NaN while every gradient stays finite; only the all-reduced
    loss makes rank 0 see it. Both ranks must skip (else their replicas would differ)."""
    from core.config import OptimConfig, ParallelConfig
    from core.engine import ModelEngine
    from core.models.llama import llama_tiny
    from core.parallel.dims import build_groups
    from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    from core.transformer.model import GPTModel

    parallel = ParallelConfig(dp=2, distributed_optimizer=True)
    groups = build_groups(parallel.dims(), rank)
    torch.manual_seed(0)
    config = llama_tiny()
    engine = ModelEngine(
        config, parallel, OptimConfig(), groups, torch.device("cpu"), GPTModel(config).state_dict()
    )
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
    mb = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def loss_fn(shown_scale: float):
        def fn(logits, mb):
            loss_sum = vocab_parallel_cross_entropy(logits, mb["labels"], None).sum()
            return loss_sum / 64, {"loss_sum": loss_sum.detach() * shown_scale}

        return fn

    out = {}
    for poisoned in (True, False):
        masters = [s.master.clone() for s in engine.optimizer.shards]
        scale = float("nan") if poisoned and rank == 1 else 1.0
        result = engine.train_step([mb], loss_fn(scale), clip_grad=1.0)
        unchanged = all(
            torch.equal(m, s.master) for m, s in zip(masters, engine.optimizer.shards, strict=True)
        )
        tag = "poisoned" if poisoned else "clean"
        out[tag] = {"skipped": result.metrics.get("nonfinite", 0.0), "unchanged": float(unchanged)}
        out[tag]["finite_norm"] = float(result.grad_norm == result.grad_norm)
    return out


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank():
    from dist import run_distributed

    for rank, out in enumerate(run_distributed(_one_rank_nan_loss, 2, timeout=300)):
        assert out["poisoned"] == {"skipped": 1.0, "unchanged": 1.0, "finite_norm": 1.0}, rank
        assert out["clean"] == {"skipped": 0.0, "unchanged": 0.0, "finite_norm": 1.0}, rank


# ---- the RL loops' engine (GRPO's policy workers) --------------------------------------------------------


def test_policy_engine_skips_a_non_finite_step_and_refuses_to_save_non_finite_weights(tmp_path):
    import dataclasses

    from algorithms.policy import PolicyModel
    from core.bridge import save_hf
    from core.config import OptimConfig
    from core.models.llama import llama_tiny
    from core.transformer.model import GPTModel

    torch.manual_seed(0)
    save_hf(GPTModel(dataclasses.replace(llama_tiny(), init_std=0.2)), tmp_path / "llama")
    policy = PolicyModel.from_pretrained(tmp_path / "llama", optim=OptimConfig(lr=1e-3), micro_batch_size=4)
    ids = torch.randint(4, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 12)
    mask[:, 4:] = 1
    batch = {"input_ids": ids, "response_mask": mask}
    before = {n: w.clone() for n, w in policy.hf_weights()}
    metrics = policy.train(batch | {"advantages": torch.full((4, 12), float("nan")) * mask})
    assert metrics["loss"] != metrics["loss"] and metrics["grad_norm"] != metrics["grad_norm"]
    assert all(torch.equal(w, before[n]) for n, w in policy.hf_weights())  # skipped: no update
    assert policy.train(batch | {"advantages": mask.clone()})["grad_norm"] > 0  # and training goes on
    assert any(not torch.equal(w, before[n]) for n, w in policy.hf_weights())

    policy.save(tmp_path / "good")
    with torch.no_grad():
        next(policy.engine.chunks[0].parameters())[0, 0] = float("nan")
    with pytest.raises(RunDiverged, match="not finite"):
        policy.save(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
