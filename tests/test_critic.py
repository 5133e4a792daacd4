"""Value-head models (TransformerConfig.head == "value"; algorithms/critic.py), no Ray.

Single process: the value head replaces the output layer (and only when asked); CriticModel.values is the
head's output shifted one position right (gae's V(state before token t)); a few steps on fixed returns
lower the value loss; RewardModel scores the head at each row's last token, also after loading a
CriticModel.save checkpoint. Sharded: tp2 and pp2 (one 2-rank gloo world) give the single process's values, step
metrics and post-step values. fp32; tp splits matmuls (~1e-7 relative), so 1e-5.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from dist import run_distributed
from numerics import close as check_close

from algorithms.critic import CriticModel, RewardModel, ValueLossConfig, value_model_from_lm
from core.config import OptimConfig, ParallelConfig
from core.errors import InputError
from core.models.llama import llama_tiny
from core.transformer.model import GPTModel

B, T, MBS = 6, 12, 2
OPTIM = OptimConfig(lr=1e-2, min_lr=1e-2, weight_decay=0.0, clip_grad=0.0)
# parity: AdamW with eps=1 makes the first step lr * g / (|g| + 1), smooth in g (a tiny eps gives lr * sign(g),
# where rounding noise on a near-zero gradient flips the update)
PARITY_OPTIM = OPTIM.model_copy(update={"eps": 1.0, "lr": 0.1, "min_lr": 0.1})
TOL = 1e-5


def close(got: torch.Tensor | float, want: torch.Tensor | float, tol: float = TOL) -> None:
    check_close(got, want, tol)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def value_model() -> tuple[Any, dict[str, torch.Tensor]]:
    """A tiny Llama turned into a value model (tied embeddings, to check the tie is undone)."""
    torch.manual_seed(0)
    lm = GPTModel(dataclasses.replace(llama_tiny(), tie_embeddings=True, init_std=0.2))
    return value_model_from_lm(lm.config, lm.state_dict(), seed=1)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """B right-padded rows (pad 0): prompts of 2-4 tokens, responses of 2-6; returns ~ N(1, 1)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T)
    for b in range(B):
        prompt, response = 2 + b % 3, 2 + (3 * b) % 5
        ids[b, : prompt + response] = torch.randint(4, 100, (prompt + response,), generator=g)
        mask[b, prompt : prompt + response] = 1
    returns = (1 + torch.randn(B, T, generator=g)) * mask
    return {"input_ids": ids, "response_mask": mask, "returns": returns}


def head_outputs(config: Any, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = GPTModel(config)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(ids)[..., 0]  # (B, T)


def test_value_head_replaces_the_output_layer() -> None:
    config, state = value_model()
    assert config.head == "value" and not config.tie_embeddings
    assert llama_tiny().head == "lm" and "output_layer.weight" in GPTModel(llama_tiny()).state_dict()
    model = GPTModel(config)
    names = set(model.state_dict())
    assert {"value_head.weight", "value_head.bias"} <= names and "output_layer.weight" not in names
    assert names == set(state)
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 1)
    with pytest.raises(InputError, match="tie"):
        dataclasses.replace(config, tie_embeddings=True)


def test_values_are_the_head_shifted_by_one() -> None:
    config, state = value_model()
    data = batch()
    values = CriticModel.build(config, state, micro_batch_size=MBS).values(data)["values"]
    head = head_outputs(config, state, data["input_ids"])
    mask = data["response_mask"].bool()
    assert values.shape == (B, T) and bool((values[:, 0] == 0).all())
    # values[:, t] = V(state before token t) = head at t - 1: what advantages.gae expects
    close(values[mask], torch.nn.functional.pad(head[:, :-1], (1, 0))[mask])


def test_train_lowers_the_value_loss_and_reward_model_scores_the_last_token(tmp_path: Path) -> None:
    config, state = value_model()
    data = batch()
    critic = CriticModel.build(
        config, state, loss=ValueLossConfig(clip_range=None), optim=OPTIM, micro_batch_size=MBS
    )
    first = critic.train(data)
    for _ in range(8):
        last = critic.train(data)
    assert {"vf_loss", "vf_clip_frac", "value_mean", "value_error", "grad_norm", "lr"} <= set(last)
    assert last["vf_loss"] < 0.5 * first["vf_loss"], (first, last)
    old = critic.values(data)["values"]
    critic.loss = ValueLossConfig(clip_range=0.2)
    clipped = critic.train(data | {"old_values": old + 1.0})  # far from the values: clipping bites
    assert clipped["vf_clip_frac"] > 0

    critic.save(tmp_path / "critic")
    reward = RewardModel.build(config, state, micro_batch_size=MBS)
    reward.load(tmp_path / "critic")
    scores = reward.scores({"input_ids": data["input_ids"]})["scores"]
    lengths = (data["input_ids"] != 0).sum(dim=1)
    after = critic.values(data | {"response_mask": torch.ones(B, T)})["values"]  # uncut
    full = torch.cat([after, torch.zeros(B, 1)], dim=1)
    # the reward is the value of the state after the whole sequence
    with torch.no_grad():
        want = torch.stack(
            [critic.engine.chunks[0].eval()(data["input_ids"])[b, lengths[b] - 1, 0] for b in range(B)]
        )
    critic.engine.chunks[0].train()
    close(scores, want)
    rows = lengths < T
    close(scores[rows], full[rows.nonzero()[:, 0], lengths[rows]])
    mask = (data["input_ids"] != 0).long()
    close(reward.scores({"input_ids": data["input_ids"], "attention_mask": mask})["scores"], scores)


# ---- tp2, pp2 against the single process ----------------------------------------------------------------------


def _layouts_worker(rank: int, world_size: int, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    from core.parallel import ParallelDims, build_groups

    config, state = value_model()
    out = {}
    for name, parallel in {"tp2": ParallelConfig(tp=2), "pp2": ParallelConfig(pp=2)}.items():
        dims = ParallelDims(tp=parallel.tp, pp=parallel.pp, world_size=world_size)
        groups = build_groups(dims, rank)
        critic = CriticModel.build(
            config, state, groups, optim=PARITY_OPTIM, micro_batch_size=MBS, parallel=parallel
        )
        out[name] = critic_step(critic, data)
    return out


def critic_step(critic: CriticModel, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    values = critic.values(data)["values"]
    old = values + 0.05 * torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    metrics = critic.train(data | {"old_values": old})
    return {"values": values, "metrics": metrics, "after": critic.values(data)["values"]}


@pytest.mark.slow
def test_tp2_and_pp2_values_and_train_step_match_single_process() -> None:
    data = batch(1)
    config, state = value_model()
    want = critic_step(CriticModel.build(config, state, optim=PARITY_OPTIM, micro_batch_size=MBS), data)
    assert (want["after"] - want["values"]).abs().max() > 1e-2  # the step moved the values
    for got in (r[name] for r in run_distributed(_layouts_worker, 2, data, timeout=120) for name in r):
        close(got["values"], want["values"])
        close(got["after"], want["after"])
        assert set(got["metrics"]) == set(want["metrics"])
        for key, value in want["metrics"].items():
            close(got["metrics"][key], value)
