"""Multi-turn rollouts (rollout/multiturn.py) and the calculator environment: episodes through a real tiny model
and the native engine (turn and length limits, observation tokens masked out of the batch and the loss,
seeds), exact protocols through a scripted generator, and `rl grpo` with configs/grpo_tools_tiny.yaml."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_llama import tiny_llama_config

from algorithms.grpo import GRPOConfig, build_policy
from algorithms.rollouts import (
    Rollouts,
    advantages_of,
    build_batch,
    completions_of,
    logprob_gap,
    sample_rollouts,
    sampling_requests,
)
from core.errors import InputError
from rollout.environments import Completion, Score, build_environment
from rollout.environments.calculator import calculate
from rollout.environments.multiturn import MultiTurnEnvironment
from rollout.multiturn import TURN_SEED_STRIDE, run_episodes
from rollout.types import GenerationRequest, GenerationResult, Sample, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["12+34=", "5+7=", "40+2=", "9+9="]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: threads only fight each other on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from core.data.synthetic import save_char_tokenizer
    from core.data.tokenizer import load_tokenizer

    return load_tokenizer(save_char_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tok):
    """A tiny Llama (hidden 64, 2 layers) teacher-forced for 40 Adam steps on "a+b=c<eos>": it answers with
    digits and EOS (mostly wrong), so turns end by themselves. ~2 s."""
    from core.data.synthetic import generate_arithmetic
    from core.transformer.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(tiny_llama_config(num_kv_heads=1, init_std=None))
    problems, _ = generate_arithmetic(640, 0, seed=0)
    rows = [tok(p.text)["input_ids"] + [tok.eos_token_id] for p in problems]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in ids.split(16):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def grpo_cfg(max_tokens: int = 16, kl_coef: float = 0.0, **rollout) -> GRPOConfig:
    return GRPOConfig(
        model={"init_from": "unused"},
        rollout={"n": 4, "prompts_per_step": 4, "max_tokens": max_tokens, **rollout},
        train={"global_batch_size": 4 * rollout.get("n", 4), "micro_batch_size": 8},
        optim={"lr": 1e-3, "min_lr": 1e-3},
        algorithm={"loss": {"kl_coef": kl_coef}},
    )


@pytest.fixture(scope="module")
def policy(model):
    return build_policy(grpo_cfg(), model, torch.device("cpu"))


@pytest.fixture(scope="module")
def engine(policy, tok):
    from rollout.engines.native import NativeEngine

    model = policy.generation_model()
    return NativeEngine(model, tokenizer=tok, max_model_len=32, eos_token_ids=[tok.eos_token_id])


class Replies(MultiTurnEnvironment):
    """Answers each of an episode's first `replies` turns with `reply`, then ends the episode."""

    def __init__(self, reply: str = "\n1+1=", replies: int = 10, max_turns: int = 3) -> None:
        super().__init__(max_turns=max_turns)
        self.reply, self.replies = reply, replies

    def reset(self, row):
        return {"turns": 0}

    def step(self, state, turn):
        state["turns"] += 1
        return self.reply if state["turns"] <= self.replies else None

    def judge(self, completion):
        return False, completion.finish_reason == "stop"


def episodes_of(generator, tok, env, cfg: GRPOConfig, seed: int = 5, prompts=PROMPTS):
    from algorithms.evaluation import encode_prompt

    requests = sampling_requests([encode_prompt(tok, p) for p in prompts], cfg.rollout, seed)
    return run_episodes(generator, requests, env, [{"prompt": p} for p in prompts], tok)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def samples_of(results) -> list[tuple[list[int], Sample]]:
    """(prompt ids, sample) in batch order."""
    return [(r.prompt_token_ids, s) for r in results for s in r.samples]


# ---- the driver on the tiny model and the native engine -------------------------------------------------


def test_episodes_interleave_policy_turns_with_masked_observations(engine, policy, tok):
    """One sample per episode: its turns' sampled tokens with the sampler's logprobs (mask 1), the
    observations' tokens between them (mask 0, logprob 0), in order; build_batch's response_mask is that
    mask, and the trainer's logprobs match the sampler's on every policy token of every turn."""
    env = Replies(replies=1, max_turns=3)
    results, episodes = episodes_of(engine, tok, env, grpo_cfg(max_tokens=20))
    reply = encode(tok, env.reply)
    with_observation = [e for e in episodes if e.observations]
    assert len(with_observation) >= 8  # most first turns end by EOS and get the reply
    for e in episodes:
        assert len(e.token_ids) == len(e.logprobs) == len(e.loss_mask) <= 20
        assert e.observations == [env.reply] * (len(e.turns) - 1) and len(e.turns) <= 2
        assert e.finish_reason in ("stop", "length")
        assert e.finish_reason == "length" or len(e.turns) == 2  # the environment ends it after one reply
        policy_ids = [t for t, m in zip(e.token_ids, e.loss_mask, strict=True) if m]
        assert tok.decode(policy_ids, skip_special_tokens=True) == "".join(e.turns)
    for e in with_observation:
        start = e.loss_mask.index(0)
        assert e.token_ids[start : start + len(reply)] == reply
        assert e.loss_mask[start : start + len(reply)] == [0] * len(reply)
        assert e.logprobs[start : start + len(reply)] == [0.0] * len(reply)
        assert all(e.loss_mask[start + len(reply) :])  # the second turn is the policy's again
        assert e.transcript == e.turns[0] + env.reply + e.turns[1]
    assert [s.loss_mask for r in results for s in r.samples] == [e.loss_mask for e in episodes]

    scores = env.score([e.completion() for e in episodes])
    batch = build_batch(results, scores)
    for b, (prompt, s) in enumerate(samples_of(results)):
        P, R = len(prompt), len(s.token_ids)
        assert batch["response_mask"][b, P : P + R].tolist() == s.loss_mask
        assert not batch["response_mask"][b, :P].any() and not batch["response_mask"][b, P + R :].any()
    trainer = policy.logprobs(batch)["logprobs"]
    assert (
        logprob_gap(trainer, batch["sampler_logprobs"], batch["response_mask"])["rollout/logprob_gap_max"]
        < 1e-4
    )
    everything = (batch["input_ids"] != 0).float()  # the metric would see the observations' 0.0 placeholders
    assert logprob_gap(trainer, batch["sampler_logprobs"], everything)["rollout/logprob_gap_max"] > 0.1


def test_turn_and_length_limits(engine, tok):
    # An environment that always answers: only max_turns or the token budget end an episode.
    _, episodes = episodes_of(engine, tok, Replies(max_turns=2), grpo_cfg(max_tokens=24))
    assert {e.finish_reason for e in episodes} <= {"max_turns", "length"}
    assert any(e.finish_reason == "max_turns" for e in episodes)
    for e in episodes:
        assert len(e.turns) <= 2 and len(e.token_ids) <= 24
        assert len(e.observations) == len(e.turns) - 1  # the last turn's reply is never appended
        if e.finish_reason == "max_turns":
            assert len(e.turns) == 2 and e.completion().finish_reason == "max_turns"
            assert e.sample().finish_reason == "length"  # cut short: not a finished episode
    # A budget of 4 tokens: no reply (5 tokens) fits after a turn, so every episode has one turn.
    results, episodes = episodes_of(engine, tok, Replies(), grpo_cfg(max_tokens=4))
    assert all(len(e.turns) == 1 and len(e.token_ids) <= 4 and all(e.loss_mask) for e in episodes)
    assert all(e.finish_reason == "length" for e in episodes)
    assert all(s.finish_reason == "length" for r in results for s in r.samples)


def test_seeds_depend_only_on_the_episode_and_turn(engine, tok):
    """Turn k of sample j of a request seeded s draws with s + j + k * 2**32: the same episodes on a rerun,
    alone or among others, and turn 0 is exactly single-turn generation."""

    class Spy:
        def __init__(self):
            self.requests = []

        def generate(self, requests):
            self.requests.append(requests)
            return engine.generate(requests)

    env, cfg = Replies(replies=2, max_turns=3), grpo_cfg(max_tokens=20)
    spy = Spy()
    _, episodes = episodes_of(spy, tok, env, cfg, seed=100)
    first_turn = {r.request_id: [] for r in spy.requests[0]}
    for r in spy.requests[0]:
        first_turn[r.request_id].append(r.params.seed)
    assert first_turn["0"] == [100, 101, 102, 103] and first_turn["3"] == [112, 113, 114, 115]
    later = {r.params.seed for r in spy.requests[1]}
    assert later <= {100 + e + TURN_SEED_STRIDE for e in range(16)} and len(later) == len(spy.requests[1])
    assert all(r.params.stop == () and r.params.n == 1 for turn in spy.requests for r in turn)

    _, again = episodes_of(engine, tok, env, cfg, seed=100)
    assert [e.token_ids for e in again] == [e.token_ids for e in episodes]
    _, alone = episodes_of(engine, tok, env, cfg, seed=100 + 2 * 4, prompts=PROMPTS[2:3])
    assert [e.token_ids for e in alone] == [e.token_ids for e in episodes[8:12]]
    single = engine.generate(
        sampling_requests([r.prompt_token_ids for r in spy.requests[0][::4]], cfg.rollout, 100)
    )
    for e, s in zip(episodes, [s for r in single for s in r.samples], strict=True):
        assert e.token_ids[: len(s.token_ids)] == s.token_ids


def test_observation_tokens_get_no_gradient(model, engine, policy, tok):
    """Whatever the batch holds at observation positions (old/ref logprobs, advantages, even the trainer's
    logprobs) changes neither the loss nor the update: they are masked out of every term."""
    from algorithms.losses import POLICY_LOSSES

    env = Replies(replies=1, max_turns=2)
    results, episodes = episodes_of(engine, tok, env, grpo_cfg(max_tokens=20))
    scores = [Score(float(i % 3), False, True) for i in range(len(episodes))]  # varied: nonzero advantages
    batch = build_batch(results, scores)
    cfg = grpo_cfg(max_tokens=20, kl_coef=0.1)
    batch["advantages"] = advantages_of(batch, cfg.algorithm)
    observation = torch.zeros_like(batch["response_mask"], dtype=torch.bool)
    for b, (prompt, s) in enumerate(samples_of(results)):
        P = len(prompt)
        observation[b, P : P + len(s.token_ids)] = torch.tensor(s.loss_mask) == 0
    assert observation.sum() >= 10
    assert torch.all(batch["advantages"][observation] == 0)

    logprobs = policy.logprobs(batch)["logprobs"].requires_grad_()
    loss, _ = POLICY_LOSSES.get("ppo_clip")(logprobs, None, batch["advantages"], batch["response_mask"])
    loss.backward()
    assert (
        torch.all(logprobs.grad[observation] == 0)
        and logprobs.grad[batch["response_mask"].bool()].abs().sum() > 0
    )
    moved = torch.where(observation, logprobs.detach() - 3.0, logprobs.detach())
    loss_moved, _ = POLICY_LOSSES.get("ppo_clip")(
        moved, logprobs.detach(), batch["advantages"], batch["response_mask"]
    )
    torch.testing.assert_close(loss_moved, loss.detach(), rtol=0, atol=0)

    # The whole update: two copies of the policy, one trained on a batch scrambled at the observations.
    batch |= {"old_logprobs": logprobs.detach(), "ref_logprobs": logprobs.detach() - 0.1}
    scrambled = dict(batch)
    for key in ("old_logprobs", "ref_logprobs", "advantages"):
        scrambled[key] = torch.where(observation, torch.randn_like(batch[key]) * 5, batch[key])
    keys = ("input_ids", "response_mask", "advantages", "old_logprobs", "ref_logprobs", "group_index")
    a, b = (build_policy(cfg, copy.deepcopy(model), torch.device("cpu")) for _ in range(2))
    metrics_a = a.train({k: batch[k] for k in keys})
    metrics_b = b.train({k: scrambled[k] for k in keys})
    for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
        assert metrics_a[key] == metrics_b[key], key
    for pa, pb in zip(a.generation_model().parameters(), b.generation_model().parameters(), strict=True):
        assert torch.equal(pa, pb)


# ---- the calculator environment ---------------------------------------------------------------------------


class Scripted:
    """A Generator whose turn k of every request is `turns[k]` (text; "<eos>" closes it with EOS), cut at
    max_tokens; records the requests."""

    def __init__(self, tok, *turns: str):
        self.tok, self.turns, self.requests = tok, turns, []

    def generate(self, requests):
        text = self.turns[len(self.requests)]
        ids = encode(self.tok, text.removesuffix("<eos>")) + [self.tok.eos_token_id] * text.endswith("<eos>")
        self.requests.append(requests)
        out = []
        for r in requests:
            cut = ids[: r.params.max_tokens]
            sample = Sample(cut, [-0.5] * len(cut), "stop" if cut == ids else "length")
            out.append(GenerationResult(r.request_id, r.prompt_token_ids, [sample], weight_version=3))
        return out


def test_calculator_calls_and_answers():
    assert calculate("23+58=", "1+1=") == 81 and calculate(" 7*8=", "1+1=") == 56
    assert calculate("=", "23+58=") == 81  # the prompt's own problem
    assert calculate("81", "23+58=") is None and calculate("5=", "23+58=") is None
    env = build_environment("calculator", format_reward=0.5)
    assert env.turn_stop == ("=",) and env.max_turns == 3
    row = {"prompt": "23+58="}
    assert env.step(env.reset(row), "23+58=") == "81\n" and env.step(env.reset(row), "81") is None
    scores = env.score(
        [
            Completion("23+58=", "81", "stop"),
            Completion("23+58=", "82", "stop"),
            Completion("23+58=", "23+58=", "max_turns"),
            Completion("23+58=", "81", "length"),
        ]
    )
    assert [(s.reward, s.correct, s.well_formed) for s in scores] == [
        (1.5, True, True),
        (0.5, False, True),
        (0.0, False, False),
        (1.0, True, False),
    ]
    with pytest.raises(InputError, match="prompt 3"):
        env.check_row({"prompt": "hello"}, "prompt 3")
    with pytest.raises(InputError, match="max_turns"):
        build_environment("calculator", max_turns=0)


def calculator_rollouts(tok, *turns: str, max_turns: int = 3, max_tokens: int = 16):
    """sample_rollouts as GRPOTrainer.generate runs it, on a scripted generator."""
    from algorithms.evaluation import encode_prompt

    env = build_environment("calculator", format_reward=0.5, max_turns=max_turns)
    parts = SimpleNamespace(generator=Scripted(tok, *turns), environment=env, tokenizer=tok)
    rows = [{"prompt": "23+58="}]
    rollouts = Rollouts(rows, [encode_prompt(tok, "23+58=")])
    sample_rollouts(parts, rollouts, grpo_cfg(max_tokens=max_tokens, n=2).rollout, seed=7, greedy=False)
    rollouts.scores = env.score(
        completions_of(rollouts, lambda ids: tok.decode(ids, skip_special_tokens=True))
    )
    return parts.generator, rollouts


def test_calculator_episode_through_the_grpo_phases(tok):
    generator, rollouts = calculator_rollouts(tok, "23+58=", "81<eos>")
    assert all(r.params.stop == ("=",) for turn in generator.requests for r in turn)
    (result,) = rollouts.results
    assert result.weight_version == 3 and len(result.samples) == 2
    call, observation, answer = (
        encode(tok, "23+58="),
        encode(tok, "81\n"),
        encode(tok, "81") + [tok.eos_token_id],
    )
    for sample, episode, score in zip(result.samples, rollouts.episodes, rollouts.scores, strict=True):
        assert sample.token_ids == call + observation + answer
        assert sample.loss_mask == [1] * 6 + [0] * 3 + [1] * 3
        assert sample.logprobs == [-0.5] * 6 + [0.0] * 3 + [-0.5] * 3
        assert sample.text == "23+58=81\n81" and sample.finish_reason == "stop"
        assert episode.turns == ["23+58=", "81"] and episode.observations == ["81\n"]
        assert (score.reward, score.correct, score.well_formed) == (1.5, True, True)
    assert generator.requests[1][0].prompt_token_ids == rollouts.prompt_ids[0] + call + observation
    completion = completions_of(rollouts, lambda ids: "unused")[0]
    assert completion.text == "81" and completion.row["transcript"] == "23+58=81\n81"
    batch = build_batch(rollouts.results, rollouts.scores)
    P = len(rollouts.prompt_ids[0])
    assert batch["response_mask"][0, P:].tolist() == [1.0] * 6 + [0.0] * 3 + [1.0] * 3

    # a direct answer ends the episode at once; a call in the last allowed turn ends it unanswered
    generator, rollouts = calculator_rollouts(tok, "81<eos>")
    assert len(generator.requests) == 1 and rollouts.scores[0].correct
    _, rollouts = calculator_rollouts(tok, "=", "=", max_turns=2)
    episode = rollouts.episodes[0]
    assert episode.finish_reason == "max_turns" and episode.turns == ["=", "="]
    assert (rollouts.scores[0].reward, rollouts.scores[0].well_formed) == (0.0, False)
    # the budget: the call and its result fit in 9 tokens, the answer gets no room
    _, rollouts = calculator_rollouts(tok, "23+58=", "81<eos>", max_tokens=9)
    assert rollouts.episodes[0].finish_reason == "length" and rollouts.episodes[0].observations == []


def test_single_turn_rollouts_are_unchanged(engine, tok):
    """An ordinary environment: one generate call, the engine's results as they are (no loss_mask)."""
    from algorithms.evaluation import encode_prompt

    env = build_environment("arithmetic")
    parts = SimpleNamespace(generator=engine, environment=env, tokenizer=tok)
    rollouts = Rollouts([{"prompt": p} for p in PROMPTS], [encode_prompt(tok, p) for p in PROMPTS])
    cfg = grpo_cfg().rollout
    sample_rollouts(parts, rollouts, cfg, seed=3, greedy=False)
    expected = engine.generate(sampling_requests(rollouts.prompt_ids, cfg, 3))
    assert rollouts.results == expected and rollouts.episodes == []
    assert all(s.loss_mask is None for r in rollouts.results for s in r.samples)


def test_sampling_params_stop_strings_reach_the_engine(engine, tok):
    """The calculator's "=" ends a turn inside the native engine, with the "=" kept in the turn's tokens."""
    ids = [tok.bos_token_id, *encode(tok, "12+3")]  # the model goes on with the operand's digits and "="
    params = SamplingParams(n=1, temperature=0.0, max_tokens=6, stop=("=",))
    (result,) = engine.generate([GenerationRequest(ids, params)])
    (sample,) = result.samples
    text = tok.decode(sample.token_ids, skip_special_tokens=True)
    assert text.endswith("=") and "=" not in text[:-1] and sample.finish_reason == "stop", text
    assert sample.text == text[:-1]  # the engine's text drops the stop string; the driver decodes the ids


# ---- end to end --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rl_grpo_with_the_calculator(tiny_pretrain_400, tmp_path):
    from core.utils.metrics import read_metrics
    from rl.cli import main

    run_dir = tmp_path / "grpo_tools"
    argv = [
        "grpo",
        str(ROOT / "configs/grpo_tools_tiny.yaml"),
        f"model.init_from={tiny_pretrain_400}/checkpoints/step_400",
        f"run.dir={run_dir}",
        "train.max_steps=2",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        "train.eval_every=2",
        "train.save_every=2",
        "train.progress_bar=false",
        "rollout.prompts_per_step=4",
        "rollout.n=4",
        "eval.num_prompts=8",
        "eval.samples=2",
    ]
    assert main(argv) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert 0 <= row["reward/accuracy"] <= 1 and row["rollout/logprob_gap_max"] < 1e-4
        assert "train/loss" in row and row["response/length_mean"] > 0
    assert 0 <= rows[2]["eval/accuracy"] <= 1 and "eval/sampled_accuracy" in rows[2]
    assert (run_dir / "checkpoints" / "step_2").is_dir() and (run_dir / "hf").is_dir()
