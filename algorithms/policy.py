"""PolicyModel: the policy (or reference) LM of an RL run on one rank of any training layout.

It wraps a core ModelEngine (tp, pp, dp, ZeRO-1) and speaks the RL batch convention:

    batch: dict of tensors, B sequences right-padded to T
      input_ids      (B, T) long   prompt + response tokens, padding after the end
      response_mask  (B, T)        1 on generated tokens that count in the loss, 0 on prompt and padding
      advantages     (B, T)        token-level (sequence estimators broadcast over the response)
      old_logprobs   (B, T)        optional: logprobs of the policy that sampled / the step's start
      ref_logprobs   (B, T)        needed when loss.kl_coef > 0
      is_weights     (B, T)        optional: constant per-token weights of the policy-gradient loss
                                   (truncated importance sampling against the sampler, loss.tis_cap)
    token-aligned: value[:, t] belongs to token input_ids[:, t] (its logprob given the prefix; position 0
    has none and holds 0).

Every rank of one data-parallel shard (its tp x pp ranks) is called with the same batch; different dp
ranks get different shards. `logprobs` returns the same tensor on every rank of the shard (the last
pipeline stage computes it, then broadcasts it over pp). `train` is one optimizer step whose loss is
normalised by the step's GLOBAL token / sequence count (all micro-batches, all dp ranks: an all-reduce
over dp x cp unless the caller passes `global_count`), so dp ranks together take exactly the step a
single process takes on the whole batch.

Rows are right-padded and attention is causal, so padding never changes a real token's logits: no
attention mask is built, and each micro-batch is cut after its last response token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, field_validator

from algorithms.engine_model import Batch, EngineModel, StepStats
from algorithms.losses import KL_ESTIMATORS, POLICY_LOSSES, aggregate
from algorithms.registry import Registry
from core.config import LoraConfig, OptimConfig, ParallelConfig, Schema
from core.engine import LossFn, ModelEngine
from core.errors import InputError
from core.models import Architecture
from core.parallel.dims import Groups
from core.tensor_parallel import vocab_parallel_entropy, vocab_parallel_logprobs
from core.transformer.config import TransformerConfig
from rollout.refit import gather_to_rank0_over_pp, training_weights_to_hf

# = losses.AGG_MODES
AggMode = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


class PolicyLossConfig(Schema):
    """The policy objective: loss = policy loss + kl_coef * KL(policy || ref) - entropy_coef * entropy,
    each term aggregated by agg_mode with the step's global normaliser (algorithms/losses.py)."""

    name: str = Field("ppo_clip", description="a POLICY_LOSSES name: ppo_clip, gspo, reinforce")
    clip_low: float = Field(0.2, ge=0, lt=1, description="ratio clipped below at 1 - clip_low")
    clip_high: float = Field(0.2, ge=0, description="ratio clipped above at 1 + clip_high (DAPO: 0.28)")
    dual_clip: float | None = Field(None, gt=1, description="ppo_clip only: cap -A * c for A < 0")
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL to the reference (needs ref_logprobs)")
    kl_estimator: str = Field("k3", description="a KL_ESTIMATORS name: k1, k2, k3")
    entropy_coef: float = Field(0.0, ge=0, description="weight of the entropy bonus")
    agg_mode: AggMode = Field(
        "token_mean",
        description="token_mean | seq_mean_token_sum | seq_mean_token_mean | seq_mean_token_sum_norm (each "
        "sequence's token sum / norm_length, then the mean over sequences: Dr. GRPO)",
    )
    norm_length: int | None = Field(
        None,
        ge=1,
        description="agg_mode=seq_mean_token_sum_norm: the constant every sequence's token sum is divided "
        "by (Dr. GRPO: the maximum response length); none: rollout.max_tokens",
    )
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="truncated importance sampling (Yao et al. 2025, verl's tis_imp_ratio_cap): each token's "
        "policy-gradient loss is weighted by min(exp(old_logprobs - sampler_logprobs), tis_cap), correcting "
        "for a sampler whose probabilities differ from the trainer's (e.g. vLLM in bf16); e.g. 2. Needs "
        "rollout.temperature=1 (the sampler's logprobs are raw); none: off",
    )

    @field_validator("name")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        return _registered(POLICY_LOSSES, name)

    @field_validator("kl_estimator")
    @classmethod
    def _known_kl(cls, name: str) -> str:
        return _registered(KL_ESTIMATORS, name)


def _registered(registry: Registry, name: str) -> str:
    """pydantic reports ValueErrors as validation errors (a KeyError would escape as is)."""
    try:
        registry.get(name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    return name


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Token-aligned logprobs (B, T) fp32 of input_ids under vocab-sharded logits (B, T, V/tp): column t is
    log softmax(logits[:, t - 1] / temperature)[input_ids[:, t]], column 0 is 0. Differentiable; only
    (B, T) statistics cross the tp group (no full-vocabulary gather)."""
    shifted = _shifted(logits, temperature)
    return F.pad(vocab_parallel_logprobs(shifted, input_ids[:, 1:], tp_group), (1, 0))


def token_entropy(
    logits: torch.Tensor, tp_group: dist.ProcessGroup | None, temperature: float = 1.0
) -> torch.Tensor:
    """Token-aligned entropy (B, T) fp32: column t is the entropy of the distribution token t was drawn
    from (softmax(logits[:, t - 1] / temperature)), column 0 is 0. Differentiable, vocab-parallel."""
    return F.pad(vocab_parallel_entropy(_shifted(logits, temperature), tp_group), (1, 0))


def _shifted(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    shifted = logits[:, :-1]  # position t - 1 predicts token t
    return shifted / temperature if temperature != 1.0 else shifted


class PolicyModel(EngineModel):
    """One rank's policy: `logprobs` (forward only) and `train` (one optimizer step) over RL batches,
    `hf_weights` for refit, `save` / `load`. See the module docstring for the batch contract.

    engine: the rank's ModelEngine (any tp x pp x dp layout; cp and ep are not wired here).
    micro_batch_size: rows per forward/backward on this rank; a batch of B rows runs ceil(B / mbs).
    loss: the objective `train` optimises. clip_grad: max global grad norm (0: no clipping).
    temperature: logits are divided by it in `logprobs` and `train`, so that trainer logprobs match a
    sampler's at that temperature. arch: HF architecture for `hf_weights` (None: inferred).
    """

    def __init__(
        self,
        engine: ModelEngine,
        micro_batch_size: int,
        loss: PolicyLossConfig,
        clip_grad: float,
        *,
        temperature: float = 1.0,
        arch: Architecture | str | None = None,
    ):
        super().__init__(engine, micro_batch_size)
        if temperature <= 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        if loss.agg_mode == "seq_mean_token_sum_norm" and loss.norm_length is None:
            raise InputError("loss.agg_mode=seq_mean_token_sum_norm needs loss.norm_length (the constant)")
        self.loss, self.clip_grad = loss, clip_grad
        self.temperature, self.arch = temperature, arch

    @classmethod
    def build(
        cls,
        config: TransformerConfig,
        full_state: dict[str, torch.Tensor],
        groups: Groups | None = None,
        *,
        loss: PolicyLossConfig | None = None,
        optim: OptimConfig | None = None,
        micro_batch_size: int = 8,
        clip_grad: float | None = None,
        parallel: ParallelConfig | None = None,
        device: torch.device | str = "cpu",
        param_dtype: torch.dtype = torch.float32,
        temperature: float = 1.0,
        arch: Architecture | str | None = None,
        compile_layers: bool = False,
        lora: LoraConfig | None = None,
    ) -> PolicyModel:
        """A PolicyModel on this rank of `groups` (None: a single process) from the FULL model state in
        our parameter names (e.g. GPTModel.state_dict(), or `from_pretrained` for a directory).

        parallel, compile_layers, lora: as EngineModel.build_engine. clip_grad None: optim.clip_grad.
        """
        optim = optim or OptimConfig()
        engine = cls.build_engine(
            config, full_state, groups, optim, parallel, device, param_dtype, compile_layers, lora
        )
        return cls(
            engine,
            micro_batch_size,
            loss or PolicyLossConfig(),
            optim.clip_grad if clip_grad is None else clip_grad,
            temperature=temperature,
            arch=arch,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, groups: Groups | None = None, **kwargs) -> PolicyModel:
        """`build` from a local HF checkpoint directory (config.json) or one of ours (model_config.json);
        kwargs as for `build`. Every rank reads the full state and keeps its shard."""
        from core.bridge import load_hf, load_native
        from core.bridge.hf import read_hf_config

        if (Path(path) / "config.json").is_file():
            model, arch = load_hf(path), read_hf_config(path)[0]
        else:
            model, arch = load_native(path)
        kwargs.setdefault("arch", arch)
        return cls.build(model.config, model.state_dict(), groups, **kwargs)

    # ---- logprobs ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, batch: Batch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        """{"logprobs": (B, T) fp32 token-aligned logprobs of input_ids at `temperature`, and with_entropy
        also "entropy": (B, T)}, on input_ids' device, the same on every rank of this dp shard.

        Column 0 holds 0; columns after a micro-batch's last response token (padding) hold 0 when the batch
        has a response_mask, else the logprob of the padding token. Computed micro-batch by micro-batch in
        eval mode with vocab-parallel log-softmax (no full-vocabulary gather).
        """
        names = ("logprobs", "entropy") if with_entropy else ("logprobs",)

        def collect(logits: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            out = {"logprobs": token_logprobs(logits, mb["input_ids"], self.tp_group, self.temperature)}
            if with_entropy:
                out["entropy"] = token_entropy(logits, self.tp_group, self.temperature)
            return logits.new_zeros(()), out

        out = self._forward_rows(batch, collect, names)  # (len(names), B, T)
        device = batch["input_ids"].device
        return {name: out[i].to(device) for i, name in enumerate(names)}

    # ---- training ---------------------------------------------------------------------------------------

    def train(self, batch: Batch, global_count: float | None = None) -> dict[str, float]:
        """One optimizer step on this rank's batch (split into micro-batches), every rank of the layout
        calling it together. Returns the same metrics on every rank:

            loss       the step's objective (policy loss + kl_coef * kl - entropy_coef * entropy)
            pg_loss, kl, entropy   its terms, aggregated by loss.agg_mode (kl 0 when kl_coef == 0)
            clip_frac, approx_kl, ratio_mean, ratio_max, ...   the policy loss's metrics, token means
            grad_norm  before clipping;  lr  the learning rate this step used

        global_count: the step's normaliser, loss tokens (agg_mode token_mean) or sequences with a loss
        token (seq_mean_*) over ALL dp ranks; None: summed from the local batch over groups.dp_cp_group.
        Pass it when dp ranks train on slices of one step in several calls. old_logprobs missing means
        on-policy (ratio 1). kl_coef > 0 needs ref_logprobs. is_weights, when present, weight each token's
        policy-gradient loss (not the KL or entropy terms).
        """
        cfg = self.loss
        for key in ("response_mask", "advantages"):
            if key not in batch:
                raise InputError(f"PolicyModel.train: batch has no {key!r}")
        if cfg.kl_coef > 0 and "ref_logprobs" not in batch:
            raise InputError("PolicyModel.train: loss.kl_coef > 0 needs ref_logprobs in the batch")
        keys = ("input_ids", "response_mask", "advantages", "old_logprobs", "is_weights")
        keys += ("ref_logprobs",) if cfg.kl_coef > 0 else ()
        mbs = self._micro_batches(batch, keys)
        count = self._step_count(mbs, cfg.agg_mode, global_count)
        stats = StepStats()
        return self._train_step(mbs, self._loss_fn(count, stats), stats, self.clip_grad)

    def _loss_fn(self, count: torch.Tensor, stats: StepStats) -> LossFn:
        cfg = self.loss
        policy_loss, kl_estimator = POLICY_LOSSES.get(cfg.name), KL_ESTIMATORS.get(cfg.kl_estimator)

        def loss_fn(logits: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            mask = mb["response_mask"]
            logprobs = token_logprobs(logits, mb["input_ids"], self.tp_group, self.temperature)
            # the entropy is always reported; it joins the graph only when it is part of the loss
            with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.entropy_coef > 0):
                entropy = token_entropy(logits, self.tp_group, self.temperature)
            pg_loss, pg_metrics = policy_loss(
                logprobs,
                mb.get("old_logprobs"),
                mb["advantages"],
                mask,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip,
                agg_mode=cfg.agg_mode,
                global_count=count,
                norm_length=cfg.norm_length,
                is_weights=mb.get("is_weights"),
            )
            entropy_share = aggregate(entropy, mask, cfg.agg_mode, count, cfg.norm_length)
            kl_share = torch.zeros_like(pg_loss)
            if cfg.kl_coef > 0:
                kl_tok = kl_estimator(logprobs, mb["ref_logprobs"])
                kl_share = aggregate(kl_tok, mask, cfg.agg_mode, count, cfg.norm_length)
            loss = pg_loss + cfg.kl_coef * kl_share - cfg.entropy_coef * entropy_share
            shares = {"pg_loss": pg_loss, "kl": kl_share, "entropy": entropy_share}
            stats.add({k: v.detach() for k, v in shares.items()}, pg_metrics, float(mask.bool().sum()))
            return loss, {"loss_sum": loss.detach()}

        return loss_fn

    # ---- weights out (save / load: EngineModel) ---------------------------------------------------------

    def hf_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, FULL tensor) of the whole model, one parameter at a time, for refit or export.

        Collective: every rank of the layout must exhaust the iterator together. Tensors are gathered over
        tp (and ep) and the pipeline stages stream theirs to pp rank 0, which yields the whole model; other
        pp ranks yield nothing. dp replicas yield identical streams (pick one, e.g. dp_rank 0, to feed an
        engine). dtype casts each tensor (e.g. fp32 masters -> bf16 engine). Tensors may alias parameters.
        """
        with self.engine.merged_weights():  # LoRA: W + scale * B A while the stream runs (else a no-op)
            stream = training_weights_to_hf(self.engine.chunks, self.groups, self.config, self.arch, dtype)
            yield from gather_to_rank0_over_pp(stream, self.groups, self.device)

    def refit_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """`hf_weights` as the trained forward uses them, for an engine that reads weights only: with QAT
        quantizers (algorithms/qat.py), each quantized weight fake-quantized with its smoothing applied;
        otherwise the same stream. Collective like hf_weights."""
        from algorithms.qat import fake_quantized_weights

        with fake_quantized_weights(self.engine.chunks):
            yield from self.hf_weights(dtype)

    def save_adapter(self, path: str | Path, lora: LoraConfig) -> None:
        """The LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors); collective,
        rank 0 writes."""
        from core.bridge.peft import write_peft_adapter

        write_peft_adapter(self.engine.chunks, self.groups, self.config, self.arch, path, lora)

    @torch.no_grad()
    def base_logprobs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """`logprobs` of the base model: the LoRA adapters disabled (the reference, without a copy)."""
        with self.engine.adapters_disabled():
            return self.logprobs(batch)
