"""`rl bench grpo`: seconds per full GRPO step (generate, logprobs, reference, train, refit) next to TRL's
GRPOTrainer on the same work, measured in the same process.

The work is fixed so both sides do the same: `prompts` random prompts of `prompt_len` token ids, `n` samples
each of exactly `new_tokens` tokens (EOS ignored here; `min_new_tokens` there), sampled at `temperature`, a
frozen reference for the KL term when `kl_coef` > 0 (TRL's beta), and one optimizer step per rollout over
`prompts * n` sequences. Both start from the same random weights of a model preset (our GPTModel written
once with save_hf) and score with the same seeded random rewards, so advantages are never all zero.

Ours is the real loop: algorithms.grpo.GRPOTrainer's phases on the in-process components `rl grpo` builds
(InProcessPolicy on ModelEngine, FrozenReference, the native engine sampling from the policy's own
parameters), with only the prompt source and the environment replaced. TRL runs when `trl` is importable;
otherwise its row says why. Warmup steps (engine graphs, kernels, compilation) are untimed on both sides.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from core.transformer.config import TransformerConfig

PHASES = ("refit", "generate", "score", "logprobs", "advantages", "train")
BASELINE = "TRL GRPOTrainer (baseline)"


@dataclass
class GRPOShape:
    prompts: int = 8
    n: int = 8
    prompt_len: int = 64
    new_tokens: int = 256
    temperature: float = 1.0
    micro_batch_size: int = 16
    kl_coef: float = 0.04
    lr: float = 1e-6
    steps: int = 5
    warmup: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    compile: bool = False

    @property
    def sequences(self) -> int:
        return self.prompts * self.n


@dataclass
class GRPOResult:
    name: str
    step_s: list[float] = field(default_factory=list)  # timed steps
    phases: dict[str, float] = field(default_factory=dict)  # median seconds per phase
    skipped: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.step_s) if self.step_s else None


def random_prompts(shape: GRPOShape, vocab_size: int, step: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 + step)
    # ids >= 2: the placeholder tokenizer's 0/1 are pad/eos on the TRL side
    return torch.randint(2, vocab_size, (shape.prompts, shape.prompt_len), generator=g).tolist()


def random_rewards(count: int, step: int) -> list[float]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.rand(count, generator=g).tolist()


# ---- ours ---------------------------------------------------------------------------------------------


class _NoTokenizer:
    pad_token_id = 0
    eos_token_id = None


def grpo_config(shape: GRPOShape, run_dir: Path) -> Any:
    from algorithms.grpo import GRPOConfig

    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(shape.dtype, "fp32")
    return GRPOConfig.model_validate(
        {
            "run": {"dir": str(run_dir)},
            "model": {"init_from": "random"},
            "train": {
                "max_steps": shape.warmup + shape.steps,
                "global_batch_size": shape.sequences,
                "micro_batch_size": shape.micro_batch_size,
                "device": shape.device.type,
                "compile": shape.compile,
                "progress_bar": False,
            },
            "precision": {"dtype": dtype},
            "optim": {"lr": shape.lr, "min_lr": shape.lr, "warmup_steps": 0, "weight_decay": 0.0},
            "rollout": {
                "prompts_per_step": shape.prompts,
                "n": shape.n,
                "temperature": shape.temperature,
                "max_tokens": shape.new_tokens,
                "max_num_seqs": shape.sequences,
            },
            "algorithm": {"loss": {"kl_coef": shape.kl_coef}},
        }
    )


def ours(config: TransformerConfig, state: dict[str, torch.Tensor], shape: GRPOShape) -> GRPOResult:
    """Full GRPO steps of the in-process loop; phase times from the loop's own timers."""
    from algorithms.grpo import Components, GRPOTrainer, build_policy, build_reference, needs_reference
    from algorithms.rollouts import Rollouts, sampling_requests
    from core.transformer.model import GPTModel
    from rollout.engines.native import NativeEngine
    from rollout.environments import Score

    class BenchTrainer(GRPOTrainer):
        """GRPOTrainer with random prompts, every sample exactly new_tokens long, random rewards."""

        def next_prompts(self) -> Rollouts:
            return Rollouts([{}] * shape.prompts, random_prompts(shape, config.vocab_size, self.step_count))

        def generate(
            self, rollouts: Rollouts, greedy: bool = False, step: int | None = None, round_: int = 0
        ):
            step = self.step_count if step is None else step
            requests = sampling_requests(rollouts.prompt_ids, self.cfg.rollout, step, greedy)
            requests = [replace(r, params=replace(r.params, ignore_eos=True)) for r in requests]
            rollouts.results = self.parts.generator.generate(requests)

        def score(self, rollouts: Rollouts) -> None:
            rewards = random_rewards(shape.sequences, self.step_count)
            rollouts.scores = [Score(r, r > 0.5, True) for r in rewards]

    with tempfile.TemporaryDirectory() as tmp:
        cfg = grpo_config(shape, Path(tmp))
        model = GPTModel(config)
        model.load_state_dict(state)
        policy = build_policy(cfg, model, shape.device)
        reference = build_reference(cfg, model, shape.device) if needs_reference(cfg) else None
        del model
        generation_model = policy.generation_model()
        engine = NativeEngine(
            generation_model,
            max_model_len=shape.prompt_len + shape.new_tokens,
            max_num_seqs=shape.sequences,
            seed=0,
        )
        parts = Components(
            policy,
            engine,
            lambda version: engine.use_model(generation_model, version=version),
            None,
            _NoTokenizer(),
            reference,
            colocated=False,  # one device, enough memory: the engine stays awake, as TRL's generate does
            model_config=config,
        )
        result = GRPOResult("tandem GRPO (native engine)")
        per_phase: dict[str, list[float]] = {p: [] for p in PHASES}
        try:
            trainer = BenchTrainer(cfg, parts, [{}], [])
            for i in range(shape.warmup + shape.steps):
                _sync(shape.device)
                start = time.perf_counter()
                metrics = trainer.advance()
                _sync(shape.device)
                if i >= shape.warmup:
                    result.step_s.append(time.perf_counter() - start)
                    for p in PHASES:
                        per_phase[p].append(metrics.get(f"time/{p}", 0.0))
        finally:
            engine.shutdown()
        result.phases = {p: statistics.median(v) for p, v in per_phase.items() if v}
        return result


# ---- TRL ----------------------------------------------------------------------------------------------


def trl(model_dir: Path, config: TransformerConfig, shape: GRPOShape) -> GRPOResult:
    """The same steps through trl.GRPOTrainer (HF generate), timed per optimizer step by a callback."""
    try:
        import datasets
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        return GRPOResult(BASELINE, skipped=f"trl not importable ({e.name or e})")

    total = shape.warmup + shape.steps
    prompts = [p for s in range(total) for p in random_prompts(shape, config.vocab_size, s)]
    data = datasets.Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in ids) for ids in prompts]})
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    tokenizer.pad_token, tokenizer.eos_token = "t0", "t1"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=shape.dtype, attn_implementation="sdpa")
    calls = {"n": 0}

    def reward(completions: list[str], **_: Any) -> list[float]:
        rewards = random_rewards(len(completions), calls["n"])
        calls["n"] += 1
        return rewards

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            _sync(shape.device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            _sync(shape.device)
            self.times.append(time.perf_counter() - self._start)

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=shape.sequences,
            gradient_accumulation_steps=1,
            num_generations=shape.n,
            max_completion_length=shape.new_tokens,
            generation_kwargs={"min_new_tokens": shape.new_tokens},
            temperature=shape.temperature,
            beta=shape.kl_coef,
            learning_rate=shape.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_steps=total,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            bf16=shape.dtype == torch.bfloat16,
            use_cpu=shape.device.type == "cpu",
            shuffle_dataset=False,
            seed=0,
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    return GRPOResult(BASELINE, step_s=timer.times[shape.warmup :])


# ---- the bench ----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_grpo_bench(config: TransformerConfig, shape: GRPOShape, baseline: bool = True) -> list[GRPOResult]:
    from rl.bench.generate import build_random_model, save_checkpoint

    model = build_random_model(config, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = [ours(config, state, shape)]
    if baseline:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(model, Path(tmp))
            del model
            results.append(trl(Path(tmp), config, shape))
    if shape.device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def format_table(results: list[GRPOResult]) -> str:
    base = next((r for r in results if r.name == BASELINE and r.median_s), None)
    head = f"{'implementation':<30} {'s/step':>8} {'vs base':>8}  " + " ".join(f"{p:>10}" for p in PHASES)
    lines = [head]
    for r in results:
        if r.median_s is None:
            lines.append(f"{r.name:<30} {'-':>8} {'-':>8}  ({r.skipped})")
            continue
        ratio = f"{base.median_s / r.median_s:7.2f}x" if base else f"{'-':>8}"
        phases = " ".join(f"{r.phases[p]:10.3f}" if p in r.phases else f"{'-':>10}" for p in PHASES)
        lines.append(f"{r.name:<30} {r.median_s:8.3f} {ratio}  {phases}")
    return "\n".join(lines)
