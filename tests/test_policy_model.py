"""PolicyModel (algorithms/policy.py): logprobs and one RL train step, single process and sharded.

Single process: logprobs / entropy equal log_softmax of HF transformers' logits of the same tiny Llama
(at temperature 1 and 0.7); on-policy PPO equals REINFORCE's step; training on positive advantages raises
the responses' logprobs; save / load resumes exactly.

Sharded (one 4-rank gloo world, two layouts): tp2 x dp2 with ZeRO-1 and tp2 x pp2 give the single
process's logprobs and entropies for their rows, and one train step gives the same loss, metrics, grad
norm and updated weights (read back through hf_weights). Tolerances, fp32: tp splits matmul and
vocabulary sums (~1e-7 relative), pp and dp change no arithmetic but the order of the dp gradient sum;
1e-5 on logprobs (|logprob| up to ~10) and metrics. Weights: the optimizer runs AdamW with eps=1, whose
first step is lr * g / (|g| + 1), a smooth function of the gradient (with a tiny eps it would be
lr * sign(g), where rounding noise on a near-zero gradient flips the update), so updated weights agree to
1e-6 while lr=1 moves them by ~1e-3 and more.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from dist import run_distributed
from numerics import close

from algorithms.losses import AGG_MODES
from algorithms.policy import AggMode, PolicyLossConfig, PolicyModel
from core.bridge import save_hf
from core.config import OptimConfig, ParallelConfig
from core.models.llama import llama_tiny
from core.transformer.model import GPTModel

B, T, MBS = 8, 14, 2
OPTIM = OptimConfig(lr=1.0, min_lr=0.0, weight_decay=0.0, eps=1.0, clip_grad=0.0)
LOSSES = {
    # layout -> objective: each layout's step is checked against a single process with the same objective
    "tp2_dp2_zero1": PolicyLossConfig(
        clip_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01, agg_mode="seq_mean_token_mean"
    ),
    "tp2_pp2": PolicyLossConfig(kl_coef=0.05, kl_estimator="k2", agg_mode="token_mean"),
}
LOGPROB_TOL = 1e-5
WEIGHT_TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes competing for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (GQA, untied head) saved by core.bridge as an HF checkpoint; init_std 0.2 makes
    its logits peaked, like a trained model's, rather than nearly uniform."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy") / "llama"
    save_hf(GPTModel(dataclasses.replace(llama_tiny(), init_std=0.2)), path)
    return path


def sequences_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """B right-padded rows: prompts of 2-5 tokens, responses of 3-8, pad 0 after."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    for b in range(B):
        prompt, response = 2 + b % 4, 3 + (5 * b) % 6
        ids[b, : prompt + response] = torch.randint(4, 64, (prompt + response,), generator=g)
        mask[b, prompt : prompt + response] = 1
    return {"input_ids": ids, "response_mask": mask}


def rl_batch(policy: PolicyModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sequences plus per-sequence advantages, old logprobs off the current ones (ratios around 1, some
    clipped) and a reference model's logprobs (a perturbation)."""
    g = torch.Generator().manual_seed(seed + 1)
    batch = sequences_batch(seed)
    mask = batch["response_mask"]
    current = policy.logprobs(batch)["logprobs"]
    adv = torch.randn(B, 1, generator=g).expand(B, T) * mask
    old = (current + 0.3 * torch.randn(B, T, generator=g)) * mask
    ref = (current + 0.5 * torch.randn(B, T, generator=g)) * mask
    return batch | {"advantages": adv.contiguous(), "old_logprobs": old, "ref_logprobs": ref}


def full_weights(policy: PolicyModel) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in policy.hf_weights()}


# ---- single process --------------------------------------------------------------------------------------


def test_logprobs_and_entropy_equal_hf_transformers(hf_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    batch = sequences_batch()
    with torch.no_grad():
        logits = hf(batch["input_ids"]).logits[:, :-1]  # (B, T-1, V)
    for temperature in (1.0, 0.7):
        policy = PolicyModel.from_pretrained(hf_dir, micro_batch_size=3, temperature=temperature)
        out = policy.logprobs(batch, with_entropy=True)
        logp = torch.log_softmax(logits / temperature, dim=-1)
        want = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        want_entropy = -(logp.exp() * logp).sum(-1)
        mask = batch["response_mask"].bool()
        # up to each micro-batch's last response token every position is computed; compare the response
        # and the prompt tokens of every row (all before its last response token)
        upto = torch.zeros_like(mask)
        for b in range(B):
            upto[b, 1 : int(mask[b].nonzero().max()) + 1] = True
        assert out["logprobs"].shape == (B, T) and torch.all(out["logprobs"][:, 0] == 0)
        close(out["logprobs"][upto], want[upto[:, 1:]], LOGPROB_TOL)
        close(out["entropy"][upto], want_entropy[upto[:, 1:]], LOGPROB_TOL)


def test_on_policy_ppo_step_equals_reinforce_step(hf_dir: Path) -> None:
    """old_logprobs == current logprobs: the clipped ratio is 1 everywhere, and PPO's gradient is
    REINFORCE's (-A grad logp): the same grad norm and the same updated weights."""
    results = {}
    for name in ("ppo_clip", "reinforce"):
        policy = PolicyModel.from_pretrained(
            hf_dir, loss=PolicyLossConfig(name=name), optim=OPTIM, micro_batch_size=MBS
        )
        batch = rl_batch(policy)
        batch["old_logprobs"] = policy.logprobs(batch)["logprobs"]
        metrics = policy.train(batch)
        results[name] = (metrics, full_weights(policy))
    ppo, reinforce = results["ppo_clip"], results["reinforce"]
    close(ppo[0]["ratio_mean"], 1.0, 1e-6)
    close(ppo[0]["ratio_max"], 1.0, 1e-6)
    assert ppo[0]["clip_frac"] == 0.0
    close(ppo[0]["grad_norm"], reinforce[0]["grad_norm"], 1e-5)
    assert ppo[0]["grad_norm"] > 1e-3
    for name, w in ppo[1].items():
        close(w, reinforce[1][name], WEIGHT_TOL)


def test_training_on_positive_advantages_raises_response_logprobs(hf_dir: Path) -> None:
    optim = OptimConfig(lr=1e-3, min_lr=0.0, weight_decay=0.0, clip_grad=1.0)
    policy = PolicyModel.from_pretrained(hf_dir, optim=optim, micro_batch_size=4)
    batch = sequences_batch(3)
    mask = batch["response_mask"]
    batch["advantages"] = mask.clone()
    seen = []
    for _ in range(4):
        logprobs = policy.logprobs(batch)["logprobs"]
        seen.append(float((logprobs * mask).sum()))
        metrics = policy.train(batch | {"old_logprobs": logprobs})
        assert metrics["lr"] == 1e-3 and metrics["kl"] == 0.0
    seen.append(float((policy.logprobs(batch)["logprobs"] * mask).sum()))
    assert all(b > a for a, b in zip(seen, seen[1:])), seen


def test_save_and_load_resume_the_step_exactly(hf_dir: Path, tmp_path: Path) -> None:
    optim = OptimConfig(lr=1e-3, min_lr=0.0, weight_decay=0.0)
    first = PolicyModel.from_pretrained(hf_dir, optim=optim, micro_batch_size=4)
    batch = rl_batch(first)
    first.train(batch)
    first.save(tmp_path / "policy")
    second = PolicyModel.from_pretrained(hf_dir, optim=optim, micro_batch_size=4)
    second.load(tmp_path / "policy")
    a, b = first.train(batch), second.train(batch)
    assert a == b
    for name, w in full_weights(first).items():
        assert torch.equal(w, full_weights(second)[name]), name


@pytest.mark.slow
def test_compiled_layers_give_eager_logprobs_and_step(hf_dir: Path) -> None:
    """compile_layers=True (every transformer layer through Inductor) gives the eager model's logprobs, and
    after one train step on the same batch the same logprobs again. fp32: Inductor fuses and reorders
    elementwise and reduction ops (~1e-7 relative), 1e-5 on logprobs; the step (AdamW eps=1, lr=1, smooth
    in the gradient) moves weights by ~1e-3 and carries that noise through, so 1e-4 after it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    models = {
        compiled: PolicyModel.from_pretrained(
            hf_dir, loss=LOSSES["tp2_pp2"], optim=OPTIM, micro_batch_size=MBS, compile_layers=compiled
        )
        for compiled in (False, True)
    }
    batch = rl_batch(models[False])
    before = {compiled: m.logprobs(batch)["logprobs"] for compiled, m in models.items()}
    close(before[True], before[False], 1e-5)
    for m in models.values():
        m.train(batch)
    after = {compiled: m.logprobs(batch)["logprobs"] for compiled, m in models.items()}
    assert counters["stats"]["unique_graphs"] > 0  # Dynamo really compiled the layers
    assert float((after[False] - before[False]).abs().max()) > 1e-2  # the step moved the logprobs
    close(after[True], after[False], 1e-4)


def test_hf_weights_are_the_checkpoint_bitwise(hf_dir: Path) -> None:
    from safetensors.torch import load_file

    expected = load_file(hf_dir / "model.safetensors")
    got = full_weights(PolicyModel.from_pretrained(hf_dir))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_config_errors(hf_dir: Path) -> None:
    assert typing.get_args(AggMode) == AGG_MODES
    with pytest.raises(ValueError, match="did you mean 'ppo_clip'"):  # pydantic's ValidationError
        PolicyLossConfig(name="ppo_clipp")
    policy = PolicyModel.from_pretrained(hf_dir, loss=PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(Exception, match="needs ref_logprobs"):
        policy.train(sequences_batch() | {"advantages": torch.zeros(B, T)})


# ---- sharded layouts against the single process ----------------------------------------------------------


def _layouts_worker(
    rank: int, world_size: int, hf_dir: str, batch: dict[str, torch.Tensor]
) -> dict[str, Any]:
    from core.parallel import ParallelDims, build_groups

    layouts = {
        "tp2_dp2_zero1": (ParallelDims(tp=2, dp=2, world_size=world_size), True),
        "tp2_pp2": (ParallelDims(tp=2, pp=2, world_size=world_size), False),
    }
    out: dict[str, Any] = {}
    for name, (dims, zero1) in layouts.items():
        groups = build_groups(dims, rank)
        parallel = ParallelConfig(tp=dims.tp, pp=dims.pp, dp=dims.dp, distributed_optimizer=zero1)
        policy = PolicyModel.from_pretrained(
            hf_dir, groups, loss=LOSSES[name], optim=OPTIM, micro_batch_size=MBS, parallel=parallel
        )
        rows = torch.arange(B).chunk(groups.dp_size)[groups.dp_rank]
        shard = {k: v[rows] for k, v in batch.items()}
        result = {"rows": rows, "logprobs": policy.logprobs(shard, with_entropy=True)}
        result["metrics"] = policy.train(shard)
        weights = full_weights(policy)
        assert groups.pp_rank == 0 or weights == {}  # later stages stream theirs to pp rank 0
        if groups.pp_rank == 0 and groups.dp_rank == 0:
            result["weights"] = weights
        out[name] = result
    return out


@pytest.fixture(scope="module")
def world(hf_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    batch = rl_batch(PolicyModel.from_pretrained(hf_dir))
    return batch, run_distributed(_layouts_worker, 4, str(hf_dir), batch, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LOSSES))
def test_sharded_logprobs_and_train_step_match_single_process(world, hf_dir: Path, layout: str) -> None:
    batch, results = world
    reference = PolicyModel.from_pretrained(hf_dir, loss=LOSSES[layout], optim=OPTIM, micro_batch_size=MBS)
    want_lp = reference.logprobs(batch, with_entropy=True)
    want_metrics = reference.train(batch)
    want_weights = full_weights(reference)
    assert want_metrics["clip_frac"] > 0 and want_metrics["kl"] > 0  # every term is exercised
    for rank, per_layout in enumerate(results):
        got = per_layout[layout]
        rows = got["rows"]
        for key in ("logprobs", "entropy"):
            close(got["logprobs"][key], want_lp[key][rows], LOGPROB_TOL)
        assert sorted(got["metrics"]) == sorted(want_metrics), rank
        for key, want in want_metrics.items():
            close(got["metrics"][key], want, LOGPROB_TOL)
        if "weights" in got:
            assert sorted(got["weights"]) == sorted(want_weights)
            for name, w in got["weights"].items():
                close(w, want_weights[name], WEIGHT_TOL)
    moved = max(float((w - reference_w).abs().max()) for w, reference_w in _pairs(want_weights, hf_dir))
    assert moved > 1e-3


def _pairs(weights: dict[str, torch.Tensor], hf_dir: Path):
    start = full_weights(PolicyModel.from_pretrained(hf_dir))
    return [(weights[n], start[n]) for n in weights]
