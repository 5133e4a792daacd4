"""GRPO: each phase alone on tiny objects, then `rl grpo` end to end (run, resume, bad input).

The tiny model is random (hidden 64, 2 layers) and saved as an HF directory with the char tokenizer, so
nothing here depends on a pretraining run; reward going up is checked by hand with configs/grpo_tiny.yaml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_llama_config

from algorithms.grpo import GRPOConfig
from algorithms.rl_inputs import PromptLoader, resolve_init
from algorithms.rollouts import advantages_of, build_batch, logprob_gap, sampling_requests, split_batch
from core.errors import InputError
from rollout.environments import Completion, Score
from rollout.types import GenerationResult, Sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: threads only fight each other on a shared 2-core machine (1 thread is ~20x faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def result(prompt: list[int], responses: list[list[int]]) -> GenerationResult:
    samples = [Sample(r, [-0.5 - i for i in range(len(r))], "stop") for r in responses]
    return GenerationResult("0", prompt, samples, weight_version=1)


def test_build_batch_pads_right_and_masks_the_responses():
    results = [result([1, 5, 6], [[7, 2], [8]]), result([1, 9], [[10, 11, 2]])]
    scores = [Score(1.0, True, True), Score(0.0, False, True), Score(0.5, False, False)]
    batch = build_batch(results, scores, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 6, 8, 0], [1, 9, 10, 11, 2]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
    # token-aligned: the sampler's logprob of token t sits at column t
    assert batch["sampler_logprobs"][0].tolist() == [0, 0, 0, -0.5, -1.5]
    assert batch["sampler_logprobs"][2].tolist() == [0, 0, -0.5, -1.5, -2.5]
    assert batch["group_index"].tolist() == [0, 0, 1]
    assert batch["rewards"].tolist() == [1.0, 0.0, 0.5]
    assert batch["correct"].tolist() == [1.0, 0.0, 0.0]


def test_grpo_advantages_are_group_relative_and_on_the_response_only():
    cfg = GRPOConfig(
        model={"init_from": "x"}, rollout={"n": 2, "prompts_per_step": 2}, train={"global_batch_size": 4}
    )
    results = [result([1, 5], [[7, 2], [8, 2]]), result([1, 9], [[10, 2], [11, 2]])]
    scores = [Score(r, r > 0, True) for r in (1.0, 0.0, 1.0, 1.0)]
    batch = build_batch(results, scores)
    adv = advantages_of(batch, cfg.algorithm)
    assert adv.shape == batch["input_ids"].shape
    assert torch.all(adv[batch["response_mask"] == 0] == 0)
    first, second = adv[0, 2].item(), adv[1, 2].item()
    assert first > 0 > second and first == pytest.approx(-second, rel=1e-5)
    assert torch.all(adv[2:] == 0)  # same reward in a group: no signal
    dr_grpo = advantages_of(batch, cfg.algorithm.model_copy(update={"norm_by_std": False}))
    assert dr_grpo[0, 2].item() == pytest.approx(0.5)


def test_logprob_gap_on_response_tokens_only():
    mask = torch.tensor([[0.0, 1, 1], [0, 0, 1]])
    trainer = torch.tensor([[5.0, -1.0, -2.0], [9.0, 9.0, -3.5]])
    sampler = torch.tensor([[0.0, -1.0, -2.5], [0.0, 0.0, -3.0]])
    gap = logprob_gap(trainer, sampler, mask)
    assert gap["rollout/logprob_gap_max"] == pytest.approx(0.5)
    assert gap["rollout/logprob_gap_mean"] == pytest.approx(1 / 3)


def test_sampling_requests_seed_every_sample_distinctly():
    cfg = GRPOConfig(model={"init_from": "x"}).rollout.model_copy(update={"n": 4, "temperature": 0.7})
    reqs = sampling_requests([[1, 2], [1, 3]], cfg, seed=100)
    assert [r.params.seed for r in reqs] == [100, 104] and all(r.params.n == 4 for r in reqs)
    greedy = sampling_requests([[1, 2]], cfg, seed=0, greedy=True)[0].params
    assert greedy.n == 1 and greedy.temperature == 0


def test_split_batch_in_order():
    batch = {"input_ids": torch.arange(8).view(4, 2), "group_index": torch.arange(4)}
    parts = split_batch(batch, 2)
    assert [p["group_index"].tolist() for p in parts] == [[0, 1], [2, 3]]


def test_prompt_loader_resumes_exactly_and_reshuffles_per_epoch():
    rows = [{"prompt": str(i)} for i in range(5)]
    loader = PromptLoader(rows, 3, seed=1)
    first = [loader.next_batch() for _ in range(2)]
    epoch0 = [i for i, _ in first[0]] + [i for i, _ in first[1]][:2]
    assert sorted(epoch0) == list(range(5))
    state = loader.state_dict()
    ahead = [loader.next_batch() for _ in range(3)]
    again = PromptLoader(rows, 3, seed=1)
    again.load_state_dict(state)
    assert [again.next_batch() for _ in range(3)] == ahead


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of train.global_batch_size"):
        GRPOConfig(
            model={"init_from": "x"}, rollout={"n": 3, "prompts_per_step": 3}, train={"global_batch_size": 4}
        )
    with pytest.raises(ValueError, match="rollout.n >= 2"):
        GRPOConfig(
            model={"init_from": "x"}, rollout={"n": 1, "prompts_per_step": 4}, train={"global_batch_size": 4}
        )
    with pytest.raises(InputError, match="not found.*rl pretrain"):
        resolve_init("/nonexistent/run")


# ---- with a model: a tiny Llama pretrained for a few steps on the arithmetic task (shared by the tests) ----

GRPO_FAST = [
    "train.max_steps=4",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=2",
    "train.save_every=2",
    "train.keep_last=3",
    "train.progress_bar=false",
    "optim.lr=1e-3",
    "optim.min_lr=1e-4",
    "optim.decay=cosine",
    "data.synthetic.n_train=64",
    "data.synthetic.n_eval=8",
    "rollout.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_tokens=4",
    "environment.format_reward=0.5",  # a barely trained model gets a varied reward from the format alone
    "algorithm.loss.kl_coef=0.01",  # exercises the reference
    "eval.samples=2",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A run directory with hf/: a tiny Llama (hidden 64, 2 layers) teacher-forced for 40 Adam steps on
    arithmetic text, enough to answer with digits and EOS (mostly wrong answers). ~2 s."""

    from core.bridge import save_hf
    from core.data.synthetic import generate_arithmetic, save_char_tokenizer
    from core.data.tokenizer import load_tokenizer
    from core.transformer.model import GPTModel

    run_dir = tmp_path_factory.mktemp("pretrain")
    tok_dir = save_char_tokenizer(run_dir / "tokenizer")
    tok = load_tokenizer(tok_dir)
    config = tiny_llama_config(num_kv_heads=1, init_std=None)
    torch.manual_seed(0)
    model = GPTModel(config)
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
    save_hf(model, run_dir / "hf", tokenizer_dir=tok_dir)
    return run_dir


def rl_grpo(run_dir: Path, init_from: Path, *overrides: str) -> int:
    from rl.cli import main

    config = str(ROOT / "configs/grpo_tiny.yaml")
    return main(
        ["grpo", config, *GRPO_FAST, f"run.dir={run_dir}", f"model.init_from={init_from}", *overrides]
    )


def test_logprob_gap_is_zero_after_refit_and_large_without(pretrained):
    """Trainer and sampler agree in fp32 when they hold the same weights (colocated: the same tensors;
    separate engine: after refit), and the gap metric exposes an engine left on stale weights."""
    from algorithms.evaluation import encode_prompt
    from algorithms.grpo import GRPOConfig, build_policy
    from algorithms.rl_inputs import load_init_model
    from algorithms.rollouts import advantages_of, sampling_requests
    from core.data.tokenizer import load_tokenizer
    from rollout.engines.native import NativeEngine
    from rollout.environments import build_environment
    from rollout.refit import refit_engine

    hf = pretrained / "hf"
    tok = load_tokenizer(hf)
    cfg = GRPOConfig(
        model={"init_from": str(hf)},
        rollout={"n": 4, "prompts_per_step": 4, "max_tokens": 4},
        train={"global_batch_size": 16, "micro_batch_size": 8},
        optim={"lr": 1e-2, "min_lr": 1e-2},  # one visible step
    )
    policy = build_policy(cfg, load_init_model(resolve_init(hf)), torch.device("cpu"))
    prompts = ["12+34=", "5+7=", "40+2=", "9+9="]
    ids = [encode_prompt(tok, p) for p in prompts]
    eos = [tok.eos_token_id]
    colocated = NativeEngine(policy.generation_model(), tokenizer=tok, max_model_len=16, eos_token_ids=eos)
    separate = NativeEngine(model_dir=hf, max_model_len=16, eos_token_ids=eos)

    def gap(engine) -> float:
        results = engine.generate(sampling_requests(ids, cfg.rollout, seed=5))
        texts = [[tok.decode(s.token_ids, skip_special_tokens=True) for s in r.samples] for r in results]
        env = build_environment("arithmetic", format_reward=0.5)
        scores = env.score([Completion(p, t, "stop") for p, ts in zip(prompts, texts) for t in ts])
        batch = build_batch(results, scores)
        trainer = policy.logprobs(batch)["logprobs"]
        batch |= {"old_logprobs": trainer, "advantages": advantages_of(batch, cfg.algorithm)}
        return logprob_gap(trainer, batch["sampler_logprobs"], batch["response_mask"]), batch

    for engine in (colocated, separate):
        assert gap(engine)[0]["rollout/logprob_gap_max"] < 1e-4
    _, batch = gap(colocated)
    assert batch["advantages"].abs().sum() > 0
    policy.train({k: v for k, v in batch.items() if k not in ("sampler_logprobs", "rewards", "correct")})
    assert gap(colocated)[0]["rollout/logprob_gap_max"] < 1e-4  # same tensors: nothing to refit
    assert gap(separate)[0]["rollout/logprob_gap_max"] > 1e-2  # stale weights: the metric shows it
    refit_engine(separate, policy.hf_weights(), version=2)
    assert gap(separate)[0]["rollout/logprob_gap_max"] < 1e-4


def sampled_batch(hf: Path, cfg, policy, seed: int = 5) -> dict[str, torch.Tensor]:
    """A scored batch of samples from the policy's own weights (colocated engine), with advantages."""
    from algorithms.evaluation import encode_prompt
    from core.data.tokenizer import load_tokenizer
    from rollout.engines.native import NativeEngine
    from rollout.environments import build_environment

    tok = load_tokenizer(hf)
    prompts = ["12+34=", "5+7=", "40+2=", "9+9="]
    ids = [encode_prompt(tok, p) for p in prompts]
    engine = NativeEngine(
        policy.generation_model(), tokenizer=tok, max_model_len=16, eos_token_ids=[tok.eos_token_id]
    )
    results = engine.generate(sampling_requests(ids, cfg.rollout, seed=seed))
    texts = [[tok.decode(s.token_ids, skip_special_tokens=True) for s in r.samples] for r in results]
    env = build_environment("arithmetic", format_reward=0.5)
    scores = env.score([Completion(p, t, "stop") for p, ts in zip(prompts, texts) for t in ts])
    batch = build_batch(results, scores)
    return batch | {"advantages": advantages_of(batch, cfg.algorithm)}


def tiny_cfg(hf: Path, lr: float = 1e-2, kl_coef: float = 0.1, **rollout) -> GRPOConfig:
    return GRPOConfig(
        model={"init_from": str(hf)},
        rollout={"n": 4, "prompts_per_step": 4, "max_tokens": 4, **rollout},
        train={"global_batch_size": 16, "micro_batch_size": 8},
        optim={"lr": lr, "min_lr": lr},
        algorithm={"loss": {"kl_coef": kl_coef}},
    )


def test_one_step_climbs_the_surrogate_objective(pretrained):
    """The sign and placement of the whole update (advantages on the response tokens, ppo_clip, old
    logprobs from the sampling weights): a small step raises sum(advantage * logprob) over the response
    tokens, the objective whose gradient the policy gradient is, and lowers the worse samples."""
    from algorithms.grpo import build_policy
    from algorithms.rl_inputs import load_init_model

    hf = pretrained / "hf"
    cfg = tiny_cfg(hf, lr=1e-4, kl_coef=0.0)
    policy = build_policy(cfg, load_init_model(resolve_init(hf)), torch.device("cpu"))
    batch = sampled_batch(hf, cfg, policy)
    mask, advantages = batch["response_mask"], batch["advantages"]
    negative = (advantages * mask).sum(-1) < 0
    assert negative.any() and (advantages > 0).any()
    batch["old_logprobs"] = policy.logprobs(batch)["logprobs"]
    policy.train({k: v for k, v in batch.items() if k not in ("sampler_logprobs", "rewards", "correct")})
    change = (policy.logprobs(batch)["logprobs"] - batch["old_logprobs"]) * mask  # (B, T)
    assert (advantages * change).sum() > 0
    assert change.sum(-1)[negative].mean() < 0


@pytest.mark.slow
def test_train_compile_compiles_the_policy_layers(pretrained):
    """train.compile=true reaches the policy's ModelEngine: its layers run compiled (Dynamo makes graphs) and
    give the eager policy's logprobs (fp32, within 1e-5)."""
    from torch._dynamo.utils import counters

    from algorithms.grpo import build_policy
    from algorithms.rl_inputs import load_init_model

    hf = pretrained / "hf"
    eager_cfg = tiny_cfg(hf)
    compiled_cfg = eager_cfg.model_copy(
        update={"train": eager_cfg.train.model_copy(update={"compile": True})}
    )
    model = load_init_model(resolve_init(hf))
    eager = build_policy(eager_cfg, model, torch.device("cpu"))
    batch = sampled_batch(hf, eager_cfg, eager)
    counters.clear()
    compiled = build_policy(compiled_cfg, model, torch.device("cpu"))
    got = compiled.logprobs(batch)["logprobs"]
    assert counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(got, eager.logprobs(batch)["logprobs"], rtol=0, atol=1e-5)


def test_frozen_reference_and_tempered_logprobs(pretrained):
    """Reference: forward only (no grads, no optimizer), equal to the initial policy and unmoved by training.
    At sampling temperature T the policy's and reference's logprobs are log_softmax(logits / T); the
    sampler's stay raw (equal to the policy's at T = 1, checked in the refit test above)."""
    from algorithms.grpo import build_policy, build_reference
    from algorithms.rl_inputs import load_init_model

    hf = pretrained / "hf"
    cfg = tiny_cfg(hf, temperature=0.5)
    model = load_init_model(resolve_init(hf))
    policy = build_policy(cfg, model, torch.device("cpu"))
    reference = build_reference(cfg, model, torch.device("cpu"))
    assert all(not p.requires_grad for p in reference.model.parameters())

    batch = sampled_batch(hf, cfg, policy)
    mask = batch["response_mask"].bool()
    ids = batch["input_ids"]
    with torch.no_grad():
        logits = model(ids)[:, :-1].double()
    tempered = torch.log_softmax(logits / 0.5, -1).gather(-1, ids[:, 1:, None])[..., 0]
    raw = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    trainer = policy.logprobs(batch)["logprobs"]
    ref = reference.logprobs(batch)["logprobs"]
    assert torch.allclose(trainer[:, 1:][mask[:, 1:]].double(), tempered[mask[:, 1:]], atol=1e-5)
    assert torch.allclose(ref[mask], trainer[mask], atol=1e-5)
    assert torch.allclose(batch["sampler_logprobs"][:, 1:][mask[:, 1:]].double(), raw[mask[:, 1:]], atol=1e-4)
    assert not torch.allclose(trainer[mask].double(), batch["sampler_logprobs"][mask].double(), atol=1e-2)

    batch |= {"old_logprobs": trainer, "ref_logprobs": ref}
    metrics = policy.train(
        {k: v for k, v in batch.items() if k not in ("sampler_logprobs", "rewards", "correct")}
    )
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # first step: policy == reference
    assert torch.equal(reference.logprobs(batch)["logprobs"], ref)
    assert not torch.allclose(policy.logprobs(batch)["logprobs"][mask], ref[mask], atol=1e-4)
    assert all(p.grad is None for p in reference.model.parameters())


def test_reference_only_with_a_kl_penalty(pretrained):
    from algorithms.grpo import build_components, check_inputs

    hf = pretrained / "hf"
    for kl_coef, has_ref in ((0.0, False), (0.1, True)):
        cfg = tiny_cfg(hf, kl_coef=kl_coef)
        parts, _ = build_components(cfg, check_inputs(cfg), torch.device("cpu"))
        assert (parts.reference is not None) == has_ref


def test_rl_grpo_end_to_end_then_resume_gives_the_same_continuation(pretrained, tmp_path):
    from core.bridge import load_hf
    from core.utils.metrics import read_metrics

    run_dir = tmp_path / "grpo"
    assert rl_grpo(run_dir, pretrained) == 0  # init from an `rl pretrain` run directory
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in (
        "reward/mean",
        "reward/accuracy",
        "response/length_mean",
        "train/clip_frac",
        "train/kl",
        "train/entropy",
        "train/grad_norm",
        "train/lr",
        "time/generate",
        "time/train",
    ):
        assert all(key in r for r in rows[1:]), key
    assert all(r["rollout/logprob_gap_max"] < 1e-4 for r in rows[1:])
    for row in (rows[0], rows[2], rows[4]):
        assert "eval/accuracy" in row and 0 <= row["eval/sampled_accuracy"] <= 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.png").is_file()
    assert any((run_dir / "tensorboard").iterdir())
    load_hf(run_dir / "hf")  # the export loads

    # Interrupted after step 3 (step_4 and hf/ never written): the same command resumes from step_2 and
    # replays steps 3-4 exactly (weights, optimizer, LR schedule, prompt order, sampling seeds).
    shutil.rmtree(run_dir / "checkpoints" / "step_4")
    shutil.rmtree(run_dir / "hf")
    assert rl_grpo(run_dir, pretrained) == 0
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    for before, after in zip(rows[3:], resumed[3:]):
        drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
        assert drop(after) == drop(before)


def test_bad_config_exits_2_before_writing(pretrained, tmp_path, capsys):
    run_dir = tmp_path / "bad"
    cases = {
        "rollout.nn=3": "unknown key 'rollout.nn'; did you mean 'rollout.n'",
        "parallel.tp=2": "num_kv_heads=1 is not divisible by parallel.tp=2",  # checked before Ray starts
        "rollout.max_tokens=500": "max_position_embeddings",
        "data.path=/nope.jsonl": "exactly one of data.path and data.synthetic",
        "train.compile=true parallel.dp=2 parallel.ep=2": "train.compile=true needs parallel.cp = ep = 1",
    }
    for override, message in cases.items():
        assert rl_grpo(run_dir, pretrained / "hf", *override.split()) == 2
        assert message in capsys.readouterr().err
    assert rl_grpo(run_dir, tmp_path / "missing") == 2
    assert "rl pretrain configs/pretrain_tiny.yaml" in capsys.readouterr().err
    assert not run_dir.exists()
