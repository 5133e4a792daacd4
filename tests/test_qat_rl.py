"""Quantization-aware RL (algorithms/qat.py, "RL"): `quantize:` in rl grpo / rl ppo trains the policy through
ModelOpt's fake quantizers. The native engine samples from those very modules (trainer and sampler agree),
an engine fed by refit gets the fake-quantized weights, checkpoints hold the scales (exact resume), and the
export writes quantized/ next to hf/."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401 (autouse fixture)
from tiny_llama import tiny_llama_config

from rl.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "train.max_steps=4",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=4",
    "train.save_every=2",
    "rollout.prompts_per_step=2",
    "rollout.n=4",
    "rollout.max_tokens=4",
    "data.synthetic.n_train=64",
    "data.synthetic.n_eval=8",
    "eval.num_prompts=8",
    "optim.lr=1e-2",
    "optim.min_lr=1e-2",
    "optim.warmup_steps=0",
    "precision.dtype=fp32",
]


def tiny_hf(root: Path, hidden: int) -> Path:
    """A random tiny Llama with the char tokenizer, as an HF directory (hidden 128 for int4's 128-blocks)."""
    from core.bridge import save_hf
    from core.data.synthetic import save_char_tokenizer
    from core.transformer.model import GPTModel

    config = tiny_llama_config(num_kv_heads=1, init_std=None)
    config = dataclasses.replace(config, hidden_size=hidden, ffn_hidden_size=2 * hidden, head_dim=hidden // 2)
    torch.manual_seed(0)
    save_hf(GPTModel(config), root / "hf", tokenizer_dir=save_char_tokenizer(root / "tokenizer"))
    return root / "hf"


@pytest.fixture(scope="module")
def model_64(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("m64"), 64)


@pytest.fixture(scope="module")
def model_128(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("m128"), 128)


def rl(command: str, run_dir: Path, init_from: Path, *overrides: str) -> int:
    config = str(ROOT / f"configs/{command}_tiny.yaml")
    return main([command, config, *FAST, f"run.dir={run_dir}", f"model.init_from={init_from}", *overrides])


def test_int4_refit_carries_the_fake_quantized_weights(model_128):
    """An engine fed by refit (here a native engine of its own, as vLLM is fed) samples what the trained
    forward computes: at int4_awq (weight-only) refit_weights gives the trainer's logprobs to fp32
    rounding, while the plain weights it trains leave a clear gap. Without quantizers refit_weights is
    hf_weights, tensor for tensor."""
    from algorithms.evaluation import encode_prompt
    from algorithms.grpo import GRPOConfig, build_policy
    from algorithms.qat import quantize_policy
    from algorithms.rl_inputs import load_init_model, resolve_init
    from algorithms.rollouts import build_batch, logprob_gap, sampling_requests
    from core.data.tokenizer import load_tokenizer
    from rollout.engines.native import NativeEngine
    from rollout.environments import Completion, build_environment
    from rollout.refit import refit_engine

    tok = load_tokenizer(model_128)
    cfg = GRPOConfig(
        model={"init_from": str(model_128)},
        rollout={"n": 4, "prompts_per_step": 4, "max_tokens": 4},
        train={"global_batch_size": 16, "micro_batch_size": 8},
    )
    policy = build_policy(cfg, load_init_model(resolve_init(model_128)), torch.device("cpu"))
    plain = dict(policy.hf_weights())
    assert all(torch.equal(t, plain[n]) for n, t in policy.refit_weights())

    prompts = ["12+34=", "5+7=", "40+2=", "9+9="]
    ids = [encode_prompt(tok, p) for p in prompts]
    quantize_policy(policy.policy, "int4_awq", ids)
    refit = dict(policy.refit_weights())
    assert all(torch.equal(t, plain[n]) for n, t in policy.hf_weights())  # the trained weights untouched
    changed = [n for n in refit if not torch.equal(refit[n], plain[n])]
    assert changed and all(n.endswith("proj.weight") for n in changed)  # the linears, not norms / embeddings

    engine = NativeEngine(model_dir=model_128, max_model_len=16, eos_token_ids=[tok.eos_token_id])
    env = build_environment("arithmetic", format_reward=0.5)

    versions = iter(range(2, 10))

    def gap(weights) -> float:
        refit_engine(engine, weights, version=next(versions))
        results = engine.generate(sampling_requests(ids, cfg.rollout, seed=5))
        texts = [[tok.decode(s.token_ids, skip_special_tokens=True) for s in r.samples] for r in results]
        scores = env.score([Completion(p, t, "stop") for p, ts in zip(prompts, texts) for t in ts])
        batch = build_batch(results, scores)
        trainer = policy.logprobs(batch)["logprobs"]
        return logprob_gap(trainer, batch["sampler_logprobs"], batch["response_mask"])[
            "rollout/logprob_gap_max"
        ]

    assert gap(policy.refit_weights()) < 1e-4
    assert gap(policy.hf_weights()) > 1e-2


@pytest.mark.slow
def test_rl_grpo_trains_through_quantizers_resumes_exactly_and_exports(model_64, tmp_path):
    """rl grpo with quantize: fp8 (weights and activations): the colocated native engine runs the
    quantized modules, so the logprob gap stays at fp32 rounding; checkpoints hold the scales and a resume
    replays the lost steps exactly; hf/ holds the plain trained weights and quantized/hf reads back as
    an FP8 checkpoint whose logits are the trained policy's."""
    from torch.distributed.checkpoint import FileSystemReader

    from algorithms.quantize import load_exported
    from core.bridge import load_hf
    from core.utils.metrics import read_metrics

    run_dir = tmp_path / "grpo"
    qat = ["quantize.format=fp8", "quantize.calibration_samples=8"]
    assert rl("grpo", run_dir, model_64, *qat) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["rollout/logprob_gap_max"] < 1e-4 for r in rows[1:])
    saved = FileSystemReader(str(run_dir / "checkpoints/step_2/model")).read_metadata().state_dict_metadata
    scales = [k for k in saved if k.startswith("quantizers.")]
    assert any(k.endswith("weight_quantizer._amax") for k in scales)
    assert any(k.endswith("input_quantizer._amax") for k in scales)
    meta = json.loads((run_dir / "checkpoints/step_4/meta.json").read_text())
    assert meta["quantize"] == {"format": "fp8", "calibration_samples": 8}

    quantized = run_dir / "quantized/hf"
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["quant_algo"] == "FP8"
    trained = load_hf(run_dir / "hf")
    torch.manual_seed(0)
    tokens = torch.randint(0, 20, (2, 12))
    with torch.no_grad():
        plain = trained(tokens)
        exported = load_exported(quantized)(input_ids=tokens, use_cache=False).logits
    span = (plain.max() - plain.min()).item()
    assert 0 < (exported - plain).abs().mean() < 0.05 * span  # the quantized model: near, not equal

    # Interrupted after step 3: the same command resumes from step_2 (weights, optimizer, quantizer scales)
    # and replays steps 3-4 exactly.
    shutil.rmtree(run_dir / "checkpoints/step_4")
    shutil.rmtree(run_dir / "hf")
    shutil.rmtree(run_dir / "quantized")
    assert rl("grpo", run_dir, model_64, *qat) == 0
    resumed = read_metrics(run_dir)
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [drop(r) for r in resumed[3:]] == [drop(r) for r in rows[3:]]
    assert (run_dir / "quantized/hf/hf_quant_config.json").is_file()


@pytest.mark.parametrize(
    "command, argv, says",
    [
        ("grpo", ["quantize.format=int4_awq"], "quantize.format"),  # hidden 64: int4's 128-blocks do not fit
        ("grpo", ["quantize.format=fp8", "parallel.tp=2"], "data parallelism only"),
        ("grpo", ["quantize.format=nvfp4"], "needs a CUDA GPU"),
        ("grpo", ["quantize.format=fp8", "train.compile=true"], "train.compile"),
        # no reward model; the critic from the policy's model with a fresh value head
        (
            "ppo",
            ["quantize.format=int4_awq", "environment.reward_model=null", "critic.init_from=null"],
            "quantize.format",
        ),
    ],
)
def test_a_quantize_section_that_cannot_run_stops_at_the_start(
    model_64, tmp_path, capsys, command, argv, says
):
    run_dir = tmp_path / "run"
    assert rl(command, run_dir, model_64, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()
