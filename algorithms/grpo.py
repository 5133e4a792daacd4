"""GRPO: sample N responses per prompt, score them, and push the policy towards the better ones.

One step (DESIGN.md "One GRPO step") is the composition of named phases, each a method callable alone:
    prompts -> refit -> generate -> score -> logprobs (old, ref) -> advantages -> train -> log/eval/save
The loop only talks to the interfaces of algorithms/interfaces.py (Policy, Reference, Generator,
WeightSync, Environment): `build_components` makes in-process ones for a single process; rl/ builds Ray
worker groups with the same methods for a cluster.

Batch (`build_batch`): prompt + response right-padded to T; token-aligned tensors, value[:, t] belongs to
input_ids[:, t] (position 0 is always 0).

Two kinds of logprobs (at sampling temperature T):
    sampler_logprobs      what the engine returns: RAW, log_softmax(logits) whatever T (vLLM's
                          raw_logprobs); used for the logprob-gap metric and TIS (loss.tis_cap), both
                          at T = 1 only
    old_logprobs, ref_logprobs and the trainer's new logprobs
                          TEMPERED, log_softmax(logits / T) (verl's convention): the PPO ratio and the KL
                          compare the distributions the samples were drawn from
At T = 1 both are the same quantity and every step logs the gap |trainer - sampler| on the response
tokens: ~1e-6 in fp32 when refit is right, O(0.1-1) when the generator samples from other weights than
the trainer scores (the classic refit bug). At T != 1 the gap is not logged (a raw and a tempered logprob
differ by design; check refit with a T = 1 run).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from algorithms.advantages import constant_groups
from algorithms.async_rollout import RolloutQueue
from algorithms.grpo_config import GRPOConfig
from algorithms.interfaces import Batch, Environment, Generator, Policy, Reference, WeightSync
from algorithms.rl_inputs import PromptLoader, Row
from algorithms.rollouts import (
    Rollouts,
    advantages_of,
    build_batch,
    completions_of,
    join_rollouts,
    logprob_gap,
    mean_metrics,
    rollout_metrics,
    sample_rollouts,
    shaped_rewards,
    split_batch,
    take_prompts,
)
from algorithms.trainer import Trainer, model_meta, timed
from core.errors import InputError
from rollout.environments import Score
from rollout.multiturn import episode_metrics

# ------------------------------------------------------------------------------------------------- loop

# what the policy trains on (is_weights only with algorithm.loss.tis_cap; ref_logprobs added for a KL term)
POLICY_KEYS = ("input_ids", "response_mask", "advantages", "old_logprobs", "is_weights")


@dataclass
class Components:
    """What a GRPO run drives; in-process objects or worker-group handles with the same methods."""

    policy: Policy
    generator: Generator
    weight_sync: WeightSync
    environment: Environment
    tokenizer: Any
    reference: Reference | None = None
    colocated: bool = True  # generator shares the policy's devices: sleep it while training
    model_config: Any = None  # the policy's TransformerConfig (checkpoint meta, hf/ export)
    tokenizer_dir: Path | None = None
    arch: Any = None  # the HF architecture of the exports (None: inferred)


class GRPOTrainer(Trainer):
    """The driver on the shared trainer: phases as methods, `step` their composition; the base owns the
    loop, logging, checkpoints and the export."""

    stage: ClassVar[str] = "grpo"
    shown: ClassVar[tuple[str, ...]] = (
        "reward/mean",
        "reward/accuracy",
        "eval/accuracy",
        "rollout/logprob_gap_max",
    )
    plotted: ClassVar[tuple[str, ...]] = (
        "reward/mean",
        "reward/accuracy",
        "eval/accuracy",
        "eval/sampled_accuracy",
        "train/kl",
        "rollout/logprob_gap_max",
    )
    # Phases 5-7 on the step's batch, in order: each a method batch -> metrics (or None), timed as time/NAME.
    # A loop on this one (PPO) inserts its own (a critic's values) or replaces them.
    batch_phases: ClassVar[tuple[str, ...]] = ("logprobs", "advantages", "train")

    def __init__(
        self, cfg: GRPOConfig, parts: Components, train_rows: list[Row], eval_rows: list[Row]
    ) -> None:
        super().__init__(cfg)
        self.parts = parts
        self.loader = PromptLoader(train_rows, cfg.rollout.prompts_per_step, cfg.train.seed, cfg.data.shuffle)
        self.eval_rows = eval_rows[: cfg.eval.num_prompts]
        self._synced_step = -1  # the step whose weights the generator holds
        self.rollout_queue = RolloutQueue()  # rollout.asynchronous: generations launched ahead
        self._staleness = 0  # of this step's samples (asynchronous rollouts)
        self.maybe_resume()

    # ---- phases ---------------------------------------------------------------------------------------

    def encode(self, rows: Sequence[Row]) -> list[list[int]]:
        from algorithms.evaluation import encode_prompt

        return [encode_prompt(self.parts.tokenizer, row["prompt"]) for row in rows]

    def next_prompts(self) -> Rollouts:
        """Phase 1: the next batch of prompts from the (resumable) loader."""
        rows = [row for _, row in self.loader.next_batch()]
        return Rollouts(rows, self.encode(rows))

    def refit(self) -> None:
        """Phase 2: the generator samples from the policy's current weights (version = optimizer steps
        taken + 1); a no-op when it already does (e.g. right after a validation)."""
        if self._synced_step != self.step_count:
            self.parts.weight_sync(self.step_count + 1)
            self._synced_step = self.step_count

    def generate(
        self, rollouts: Rollouts, greedy: bool = False, step: int | None = None, round_: int = 0
    ) -> None:
        """Phase 3: n samples per prompt (token ids + sampler logprobs; multi-turn: whole episodes). Seeds
        come from the step that trains on them (default: the next one) and the dynamic-sampling round
        (multi-turn episodes offset turns by 2**32, rounds by 2**40), so no two draws of a run repeat."""
        step = self.step_count if step is None else step
        seed = self.cfg.train.seed * 1_000_003 + step * 10_007 * self.cfg.rollout.n + round_ * 2**40
        self.parts.generator.wake_up()
        sample_rollouts(self.parts, rollouts, self.cfg.rollout, seed, greedy)
        if self.parts.colocated:
            self.parts.generator.sleep()

    def score(self, rollouts: Rollouts) -> None:
        """Phase 4: environment rewards for every sample."""
        from rollout.environments.plugin import RewardPluginError

        decode = lambda ids: self.parts.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        try:
            rollouts.scores = self.parts.environment.score(completions_of(rollouts, decode))
        except RewardPluginError as e:  # exit 2 (rl/cli.py); fit drops a checkpoint in flight, keeps the rest
            raise RewardPluginError(
                f"{e}; the run stopped after step {self.step_count}: fix the plugin and rerun the same "
                "command to resume from the newest checkpoint"
            ) from None

    def logprobs(self, batch: Batch) -> dict[str, float]:
        """Phase 5: old (policy) and reference logprobs on the batch, at the sampling temperature, from the
        weights the samples were drawn with (before this step's updates); returns the logprob-gap metrics
        (T = 1 only: see the module docstring)."""
        out = self.parts.policy.logprobs(batch)
        batch["old_logprobs"] = out["logprobs"]
        if self.parts.reference is not None:
            batch["ref_logprobs"] = self.parts.reference.logprobs(batch)["logprobs"]
        if self.cfg.rollout.temperature != 1.0:
            return {}
        old, sampler, mask = batch["old_logprobs"], batch["sampler_logprobs"], batch["response_mask"]
        metrics = logprob_gap(old, sampler, mask)
        if self._staleness > 0:  # samples of older weights: the gap is how far the policy moved since
            metrics = {k.replace("logprob_gap", "stale_logprob_gap"): v for k, v in metrics.items()}
            if self.cfg.rollout.asynchronous.correction == "behaviour":
                batch["old_logprobs"] = sampler * mask  # the ratio to the policy that drew the samples
                return metrics
        if self.cfg.algorithm.loss.tis_cap is not None:  # T = 1 here (the config refuses TIS at T != 1)
            from algorithms.losses import truncated_is_weights

            batch["is_weights"], tis = truncated_is_weights(
                old, sampler, mask, self.cfg.algorithm.loss.tis_cap
            )
            metrics |= tis
        return metrics

    def advantages(self, batch: Batch) -> dict[str, float] | None:
        """Phase 6: the configured estimator."""
        batch["advantages"] = advantages_of(batch, self.cfg.algorithm)

    def train(self, batch: Batch) -> dict[str, float]:
        """Phase 7: algorithm.ppo_epochs passes over the rollout, each over its sequences in an order drawn
        from (seed, step, pass), one optimizer step per mini-batch of train.global_batch_size sequences
        (`train_mini_batch`). From the second mini-batch on the policy has moved: the ratio to old_logprobs
        leaves 1 and the clip acts (train/clip_frac). Metrics: means over the mini-batches."""
        rollout = self.train_inputs(batch)
        rows = [
            self.train_mini_batch(mb)
            for epoch in range(self.cfg.algorithm.ppo_epochs)
            for mb in split_batch(self._shuffled(rollout, epoch), self.cfg.mini_batches)
        ]
        return mean_metrics(rows)

    def train_inputs(self, batch: Batch) -> Batch:
        """What the mini-batches are cut from: the policy's inputs (ref_logprobs only for a KL loss term;
        with algorithm.overlong.filter, truncated responses masked out of the loss)."""
        keys = POLICY_KEYS + (("ref_logprobs",) if self.cfg.algorithm.loss.kl_coef > 0 else ())
        rollout = {k: batch[k] for k in keys if k in batch}
        if "truncated" in batch:
            rollout["response_mask"] = batch["response_mask"] * (1.0 - batch["truncated"]).unsqueeze(-1)
        return rollout

    def train_mini_batch(self, mb: Batch) -> dict[str, float]:
        """One optimizer step of the policy; its metrics as train/* (or their own section, e.g. tis/)."""
        metrics = self.parts.policy.train(mb)
        return {k if "/" in k else f"train/{k}": v for k, v in metrics.items()}

    def _shuffled(self, batch: Batch, epoch: int) -> Batch:
        """The rows in an order drawn from (seed, step, epoch): a resumed run shuffles as the first did."""
        seed = self.cfg.train.seed * 1_000_003 + self.step_count * 1009 + epoch
        order = torch.randperm(batch["input_ids"].shape[0], generator=torch.Generator().manual_seed(seed))
        return {k: v[order] for k, v in batch.items()}

    def sample(self, times: dict[str, float]) -> tuple[Rollouts, dict[str, float]]:
        """Phases 1, 3 and 4: the next prompts, their samples and scores. With rollout.dynamic_sampling
        (DAPO), rounds of them until rollout.prompts_per_step groups have rewards (as `shaped_rewards` makes
        them) that are not all equal: the others are dropped, and surplus groups of the last round too.
        Each round takes the loader's next prompts, so a resumed run (the loader's position is part of
        every checkpoint) samples what the first one did. InputError when max_rounds are not enough."""
        ds, wanted = self.cfg.rollout.dynamic_sampling, self.cfg.rollout.prompts_per_step
        kept: list[Rollouts] = []
        sampled = dropped = 0
        for round_ in range(1, (ds.max_rounds if ds.enabled else 1) + 1):
            rollouts = self.next_prompts()
            with timed(times, "generate"):
                self.generate(rollouts, round_=round_ - 1)
            with timed(times, "score"):
                self.score(rollouts)
            if not ds.enabled:
                return rollouts, {}
            batch = build_batch(rollouts.results, rollouts.scores, self.pad_id)
            constant = constant_groups(shaped_rewards(batch, self.cfg), batch["group_index"]).tolist()
            kept.append(take_prompts(rollouts, [i for i, c in enumerate(constant) if not c]))
            sampled, dropped = sampled + len(constant), dropped + sum(constant)
            if sum(len(r.rows) for r in kept) >= wanted:
                metrics = {
                    "rollout/dynamic_rounds": float(round_),
                    "rollout/groups_dropped": float(dropped),
                    "rollout/prompts_sampled": float(sampled),
                }
                return take_prompts(join_rollouts(kept), range(wanted)), metrics
        raise InputError(
            f"rollout.dynamic_sampling: {ds.max_rounds} rounds of {wanted} prompts left "
            f"{sum(len(r.rows) for r in kept)} of the {wanted} groups whose rewards differ at step "
            f"{self.step_count + 1} (every sample of the others got the same reward: the prompts are too easy or "
            "too hard for the model); raise rollout.dynamic_sampling.max_rounds, or turn it off"
        )

    def sample_async(self, times: dict[str, float]) -> tuple[Rollouts, dict[str, float]]:
        """Phases 1, 3, 4 with rollout.asynchronous (algorithms/async_rollout.py): this step's samples,
        launched max_staleness steps ago (now when none is pending), then, with the engines idle, a refit
        and the launches that keep max_staleness generations running while this step trains.
        time/generate is the wait for the samples; time/generate_background what generating them took."""
        queue, ahead = self.rollout_queue, self.cfg.rollout.asynchronous.max_staleness
        if not queue.pending:
            with timed(times, "refit"):
                self.refit()
            self.launch(self.step_count)
        with timed(times, "generate"):
            launched, (rollouts, seconds) = queue.pop()
            queue.drain()
        with timed(times, "refit"):
            self.refit()
        while len(queue.pending) < ahead:
            self.launch(self.step_count + 1 + len(queue.pending))
        self._staleness = self.step_count - launched.version
        times["time/generate_background"] = seconds
        staleness = float(self._staleness)
        return rollouts, {"rollout/staleness_mean": staleness, "rollout/staleness_max": staleness}

    def launch(self, step: int) -> None:
        """Draw step `step`'s prompts now and generate + score them in the background (the engines hold
        the weights of the last refit: version `self._synced_step`)."""
        loader_state = self.loader.state_dict()
        rollouts = self.next_prompts()

        def work() -> tuple[Rollouts, float]:
            start = time.perf_counter()
            self.generate(rollouts, step=step)
            self.score(rollouts)
            return rollouts, time.perf_counter() - start

        self.rollout_queue.launch(step, self._synced_step, work, loader_state)

    def fit(self) -> dict[str, float]:
        try:
            return super().fit()
        finally:
            self.rollout_queue.close()

    def shape_rewards(self, batch: Batch, rollouts: Rollouts) -> dict[str, float]:
        """batch["rewards"] as the advantages see them (`shaped_rewards`: DAPO's overlong penalty), and with
        algorithm.overlong.filter batch["truncated"] (B,) 1.0 for a response cut at max_tokens."""
        overlong = self.cfg.algorithm.overlong
        if overlong.filter:
            finished = [s.finish_reason for r in rollouts.results for s in r.samples]
            batch["truncated"] = torch.tensor([float(reason == "length") for reason in finished])
        if overlong.buffer_len == 0:
            return {}
        shaped = shaped_rewards(batch, self.cfg)
        penalty = shaped - batch["rewards"]
        batch["rewards"] = shaped
        return {"reward/overlong_penalty": float(penalty.mean()), "reward/shaped_mean": float(shaped.mean())}

    def step(self) -> dict[str, float]:
        """One GRPO step: refit, phases 1, 3, 4 (`sample`) make the batch and its rewards (`shape_rewards`),
        then `batch_phases`; returns the step's metrics."""
        times: dict[str, float] = {}
        start = time.perf_counter()
        if self.cfg.rollout.asynchronous.enabled:
            rollouts, sampling = self.sample_async(times)
        else:
            with timed(times, "refit"):
                self.refit()
            rollouts, sampling = self.sample(times)
        batch = build_batch(rollouts.results, rollouts.scores, self.pad_id)
        batch["staleness"] = torch.full((len(rollouts.scores),), float(self._staleness))
        metrics = rollout_metrics(batch, rollouts.scores, rollouts.results) | sampling
        metrics |= episode_metrics(rollouts.episodes)
        metrics |= self.shape_rewards(batch, rollouts)
        for phase in self.batch_phases:
            with timed(times, phase):
                metrics.update(getattr(self, phase)(batch) or {})
        times["time/step"] = time.perf_counter() - start
        return {**metrics, **times}

    @property
    def pad_id(self) -> int:
        return self.parts.tokenizer.pad_token_id or 0

    # ---- phase 8: validate, save, log -----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy (and mean reward) on the held-out prompts, with the current weights."""
        if not self.eval_rows:
            return {}
        self.rollout_queue.drain()  # the engines are idle before a refit
        self.refit()
        greedy = self._eval_scores(greedy=True)
        n = max(1, len(greedy))
        metrics = {
            "eval/accuracy": sum(s.correct for s in greedy) / n,
            "eval/reward": sum(s.reward for s in greedy) / n,
        }
        if self.cfg.eval.samples > 0:
            sampled = self._eval_scores(greedy=False)
            metrics["eval/sampled_accuracy"] = sum(s.correct for s in sampled) / max(1, len(sampled))
        return metrics

    def _eval_scores(self, greedy: bool) -> list[Score]:
        rollouts = Rollouts(list(self.eval_rows), self.encode(self.eval_rows))
        eval_cfg = self.cfg.rollout.model_copy(
            update={
                "max_tokens": self.cfg.eval.max_tokens or self.cfg.rollout.max_tokens,
                "n": max(1, self.cfg.eval.samples),
            }
        )
        self.parts.generator.wake_up()
        sample_rollouts(self.parts, rollouts, eval_cfg, 0, greedy)
        if self.parts.colocated:
            self.parts.generator.sleep()
        self.score(rollouts)
        return rollouts.scores

    # ---- checkpoints and export (the base trainer drives them) ------------------------------------------

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_rows)

    def save_model(self, path: Path) -> None:
        self.parts.policy.save(path)  # path/model (DCP: weights + optimizer) and the LR schedule

    def load_model(self, path: Path) -> None:
        self.parts.policy.load(path)
        self._synced_step = -1

    def loop_state(self) -> dict[str, Any]:
        """The prompt loader's position; with generations launched ahead, where it stood before them (a
        resumed run draws their prompts again)."""
        return {"data": self.rollout_queue.loader_state or self.loader.state_dict()}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["data"])

    def meta(self) -> dict[str, Any]:
        meta = model_meta(self.parts.model_config, self.parts.arch)
        if self.cfg.lora is not None:  # checkpoints hold base weights + adapters: the next stage merges them
            meta["lora"] = self.cfg.lora.model_dump(mode="json")
        if self.cfg.quantize is not None:  # a record: the checkpoint's weights are the plain model's
            meta["quantize"] = self.cfg.quantize.model_dump(mode="json")
        return meta

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.parts.tokenizer_dir

    def write_hf(self, path: Path) -> None:
        write_hf(self.parts.policy.hf_weights(), self.parts.model_config, path, self.parts.tokenizer_dir)

    def export(self) -> Path:
        """hf/ (LoRA adapters merged); with LoRA also adapter/ in PEFT's format; with QAT also quantized/
        (algorithms/qat.py: the unified HF checkpoint and modelopt_state.pth)."""
        from algorithms.trainer import publish_dir

        out = super().export()
        if self.cfg.lora is not None:
            publish_dir(
                self.run_dir / "adapter", lambda tmp: self.parts.policy.save_adapter(tmp, self.cfg.lora)
            )
        if self.cfg.quantize is not None:
            publish_dir(self.run_dir / "quantized", lambda tmp: self.write_quantized(out, Path(tmp)))
        return out

    def write_quantized(self, hf_dir: Path, path: Path) -> None:
        """QAT: quantized/ from the exported hf/ (the trained weights) and the policy's quantizer scales."""
        from algorithms.qat import export_quantized
        from core.bridge import load_hf

        state = self.parts.policy.quantizer_state()
        model = load_hf(hf_dir).float()
        export_quantized(model, state, self.cfg.quantize.format, self.parts.arch, self.tokenizer_dir, path)


def write_hf(
    hf_weights: Iterator[tuple[str, torch.Tensor]], config: Any, path: Path, tokenizer_dir: str | Path | None
) -> None:
    """config.json + model.safetensors (+ tokenizer files) from a stream of HF-named tensors."""
    import json

    from safetensors.torch import save_file

    from core.bridge.convert import resolve_architecture
    from core.bridge.hf import copy_tokenizer_files

    path.mkdir(parents=True, exist_ok=True)
    hf_config = resolve_architecture(None, config).hf_config_from(config)
    # clone: HF tensors split from one fused parameter share storage, which safetensors refuses.
    tensors = {name: t.detach().cpu().clone() for name, t in hf_weights}
    hf_config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ build


@dataclass
class Inputs:
    """Everything read from disk before the run starts (so bad input fails before anything is written)."""

    source: Any  # rl_inputs.InitSource
    tokenizer: Any
    tokenizer_dir: Path
    environment: Any
    train_rows: list[Row]
    eval_rows: list[Row]
    max_model_len: int


def check_inputs(cfg: GRPOConfig) -> Inputs:
    """Model source, tokenizer, environment, every prompt row and the context length, checked up front."""
    from algorithms.evaluation import encode_prompt
    from algorithms.rl_inputs import (
        arithmetic_prompts,
        init_arch_name,
        init_config,
        read_prompt_file,
        resolve_init,
    )
    from core.data.tokenizer import load_tokenizer

    if cfg.parallel.world_size > 1:
        raise InputError("rl grpo runs in a single process for now: set parallel.tp/pp/cp/dp to 1")
    source = resolve_init(cfg.model.init_from)
    cfg.model.check_source(init_config(source), init_arch_name(source))
    tokenizer_dir = Path(cfg.model.tokenizer) if cfg.model.tokenizer else source.tokenizer
    if tokenizer_dir is None:
        raise InputError(f"model.tokenizer: no tokenizer next to {source.path}; set model.tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    env = cfg.environment.build(tokenizer)
    if cfg.data.synthetic is not None:
        syn = cfg.data.synthetic
        train_rows, eval_rows = arithmetic_prompts(syn.n_train, syn.n_eval, syn.digits, syn.ops, syn.seed)
    else:
        key = cfg.data.prompt_key
        train_rows = read_prompt_file(cfg.data.path, env.check_row, key)
        eval_rows = read_prompt_file(cfg.data.eval_path, env.check_row, key) if cfg.data.eval_path else []
    for i, row in enumerate(train_rows[:1] + eval_rows[:1]):
        env.check_row(row, f"prompt {i}")
    vocab = init_config(source).vocab_size
    if len(tokenizer) > vocab:
        raise InputError(
            f"model.tokenizer: {tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
            f"vocab_size={vocab} (ids past it have no embedding)"
        )
    longest = max(len(encode_prompt(tokenizer, r["prompt"])) for r in train_rows + eval_rows)
    max_tokens = max(cfg.rollout.max_tokens, cfg.eval.max_tokens or 0)
    max_model_len = longest + max_tokens
    limit = _max_positions(source)
    if limit is not None and max_model_len > limit:
        raise InputError(
            f"longest prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"max_position_embeddings={limit}"
        )
    return Inputs(source, tokenizer, Path(tokenizer_dir), env, train_rows, eval_rows, max_model_len)


def _max_positions(source: Any) -> int | None:
    import json

    if source.kind == "hf":
        return json.loads((source.path / "config.json").read_text()).get("max_position_embeddings")
    return None  # checked again by the engine, which knows the model


def build_components(cfg: GRPOConfig, inputs: Inputs, device: torch.device) -> tuple[Components, Any]:
    """In-process policy (+ reference), generation engine and weight sync; returns them and the model
    config (for the HF export)."""
    from algorithms.rl_inputs import init_arch_name, load_init_model

    torch.manual_seed(cfg.train.seed)
    full = load_init_model(inputs.source)
    model_config = full.config
    policy = build_policy(cfg, full, device)
    if cfg.quantize is not None:  # the policy only: the reference stays the full-precision model
        from algorithms.evaluation import encode_prompt
        from algorithms.qat import quantize_policy

        rows = inputs.train_rows[: cfg.quantize.calibration_samples]
        prompts = [encode_prompt(inputs.tokenizer, row["prompt"]) for row in rows]
        quantize_policy(policy.policy, cfg.quantize.format, prompts)
    reference = None
    if needs_reference(cfg):
        from algorithms.inprocess_policy import AdapterFreeReference

        reference = AdapterFreeReference(policy) if cfg.lora else build_reference(cfg, full, device)
    del full
    generator, sync, colocated = build_generator(cfg, inputs, policy, device)
    parts = Components(
        policy,
        generator,
        sync,
        inputs.environment,
        inputs.tokenizer,
        reference,
        colocated,
        model_config=model_config,
        tokenizer_dir=inputs.tokenizer_dir,
        arch=init_arch_name(inputs.source),
    )
    return parts, model_config


def build_policy(cfg: GRPOConfig, model: Any, device: torch.device) -> Any:
    from algorithms.inprocess_policy import InProcessPolicy
    from core.utils.device import param_dtype

    dtype = param_dtype(cfg.precision, device)
    return InProcessPolicy(
        model,
        cfg.optim,
        cfg.algorithm.loss,
        cfg.train.micro_batch_size,
        cfg.policy_optimizer_steps,
        device,
        dtype,
        temperature=logprob_temperature(cfg),
        compile_layers=cfg.train.compile,
        lora=cfg.lora,
    )


def logprob_temperature(cfg: GRPOConfig) -> float:
    """The temperature trainer and reference logprobs are computed at: the sampling one (1 for greedy)."""
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


def needs_reference(cfg: GRPOConfig) -> bool:
    """A reference model is built (and its logprobs computed every step) only for a KL penalty."""
    return cfg.uses_reference


def build_reference(cfg: GRPOConfig, model: Any, device: torch.device) -> Any:
    """The initial policy, frozen: forward only, no optimizer state or gradient buffers."""
    from algorithms.inprocess_policy import FrozenReference
    from core.utils.device import param_dtype

    dtype = param_dtype(cfg.precision, device)
    return FrozenReference(model, cfg.train.micro_batch_size, device, dtype, logprob_temperature(cfg))


def build_generator(
    cfg: GRPOConfig, inputs: Inputs, policy: Any, device: torch.device
) -> tuple[Any, Any, bool]:
    """native: our engine generates from the policy's own parameters (no copy; sync only records the
    version). vllm: an engine started from the initial HF weights, refitted from policy.hf_weights()."""
    eos = [inputs.tokenizer.eos_token_id] if inputs.tokenizer.eos_token_id is not None else []
    if cfg.rollout.engine == "native":
        from rollout.engines.native import NativeEngine

        model = policy.generation_model()
        engine = NativeEngine(
            model,
            tokenizer=inputs.tokenizer,
            max_model_len=inputs.max_model_len,
            max_num_seqs=cfg.rollout.max_num_seqs,
            seed=cfg.train.seed,
            eos_token_ids=eos,
        )
        return engine, lambda version: engine.use_model(model, version=version), True
    from rollout.engines.vllm_engine import VLLMEngine
    from rollout.refit import refit_engine

    hf_dir = inputs.source.path if inputs.source.kind == "hf" else None
    if hf_dir is None:
        hf_dir = Path(cfg.run.dir) / "engine_init"
        write_hf(policy.refit_weights(), policy.model_config, hf_dir, inputs.tokenizer_dir)
    engine = VLLMEngine(
        hf_dir, max_model_len=inputs.max_model_len, kv_cache_gib=cfg.rollout.kv_cache_gib, seed=cfg.train.seed
    )
    return engine, lambda version: refit_engine(engine, policy.refit_weights(), version), False


def check_for_run(cfg: GRPOConfig, stage: str = "grpo") -> Inputs:
    """Every input before anything is written: the single-process checks (check_inputs refuses parallel
    layouts: one process has none), on Ray the layout against the model, and what run.dir already holds."""
    from algorithms.rl_inputs import init_config
    from algorithms.trainer import check_resume
    from core.config import ParallelConfig
    from core.engine import check_compile_layout

    inputs = check_inputs(cfg.model_copy(update={"parallel": ParallelConfig()}) if cfg.on_ray else cfg)
    config = init_config(inputs.source)
    if cfg.quantize is not None:
        from algorithms.quantize import check_blocks

        check_blocks(cfg.quantize.format, config, "quantize.format")
    if cfg.on_ray and cfg.train.compile:
        check_compile_layout(cfg.parallel)
    if cfg.on_ray and cfg.parallel.world_size > 1:
        cfg.parallel.check_model(config)
    check_resume(cfg.run.dir, stage, config, len(inputs.train_rows))
    return inputs


def run_rl(
    cfg: GRPOConfig,
    trainer_cls: type[GRPOTrainer],
    check: Callable[[Any], Inputs],
    build: Callable[[Any, Inputs, torch.device], Components],
) -> dict[str, float]:
    """An RL loop in this process (GRPO, PPO: its trainer class, its input checks and its components):
    checks every input, then trains to train.max_steps (resuming from run.dir) and exports hf/."""
    from core.config import dump_config
    from core.utils.device import resolve_device

    inputs = check(cfg)
    device = resolve_device(cfg.train.device)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    parts = build(cfg, inputs, device)
    try:
        trainer = trainer_cls(cfg, parts, inputs.train_rows, inputs.eval_rows)
        metrics = trainer.fit()
        trainer.export()
    finally:
        parts.generator.shutdown()
    trainer.plot()
    return metrics


def run_grpo(cfg: GRPOConfig) -> dict[str, float]:
    """`rl grpo` in this process (see run_rl)."""
    return run_rl(cfg, GRPOTrainer, check_for_run, lambda c, i, d: build_components(c, i, d)[0])
