"""Knowledge distillation: a student learns a frozen teacher's next-token distributions.

A loop on the shared trainer (PackedLMTrainer: checkpoints, resume, metrics, hf/ export of the student).
Teacher and student may differ in size but share one tokenizer (and vocabulary): logits are compared id by
id. The teacher is a second ModelEngine at the student's layout (tp x pp x dp x cp), run forward-only on
each step's micro-batches before the student's forward/backward; its vocab-sharded logits ride in the
micro-batch ("teacher_logits", (B, T, V/tp) on the last pipeline stage) into the student's loss, so tp
never gathers a vocabulary. Only the student is checkpointed; the teacher is reloaded from its source.

Steps (GKD, Agarwal et al. 2024): with probability algorithm.on_policy_frac (seeded by the step, the same
on every rank and on resume) a step is on-policy: the student samples responses to the step's prompts
through the native engine and the teacher scores the student's tokens; otherwise it is off-policy on the
dataset (the SFT formats: chat or prompt/completion rows, packed). The loss per response token is
(1 - hard_label_weight) * divergence + hard_label_weight * cross-entropy on the data's (or sampled)
token, the divergence one of core/tensor_parallel/cross_entropy.py's: forward KL, reverse KL or
generalized JSD (beta), at a temperature (x tau^2), optionally on the teacher's top-k logits.

ModelOpt (modelopt.torch.distill) is not in the training path: its DistillationModel wraps a student
nn.Module with a teacher and takes the loss on whole-vocabulary outputs of one forward call, whereas ours
are vocab-parallel logits of pipeline stages that the schedule calls stage by stage, and its
LogitsDistillationLoss would gather the vocabulary under tp. Its forward KL is the reference our
vocab-parallel forward KL is tested against (tests/test_distill.py).

Evaluation: eval/kl, the forward KL(teacher || student) at temperature 1 over held-out response tokens;
eval/loss, the held-out response cross-entropy; eval/accuracy, greedy task accuracy (as SFT's).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from algorithms.alignment_inputs import source_tokenizer
from algorithms.engine_trainer import PackedLMTrainer, right_padded_batch
from algorithms.model_config import ModelConfig, SourceModelConfig
from algorithms.qat import QATConfig
from algorithms.sft import SFTDataConfig, SFTEvalConfig, SFTSyntheticConfig, check_sft_data, sft_data
from algorithms.trainer import LoopConfig, check_resume
from core.config import RunConfig, Schema
from core.errors import InputError
from core.tensor_parallel.cross_entropy import (
    vocab_parallel_cross_entropy,
    vocab_parallel_divergence,
    vocab_parallel_token_correct,
)
from core.transformer.model import GPTModel


class StudentConfig(ModelConfig):
    """The student: an architecture (random init, the teacher's vocabulary), or model.init_from's weights,
    or (layers_from_teacher) the teacher's architecture with only the listed teacher layers (DistilBERT's
    initialisation: embeddings, those layers, final norm and head copied)."""

    layers_from_teacher: list[int] | None = Field(
        None, min_length=1, description="teacher layer indices the student starts from (in order)"
    )

    @model_validator(mode="after")
    def _one_init(self) -> StudentConfig:
        if self.init_from is not None and self.layers_from_teacher is not None:
            raise ValueError("set at most one of student.init_from and student.layers_from_teacher")
        return self


class DistillAlgorithmConfig(Schema):
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher)"
    )
    temperature: float = Field(1.0, gt=0, description="both distributions at this temperature (loss x T^2)")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: the teacher's weight in the mixture")
    top_k: int | None = Field(None, ge=1, description="only the teacher's k largest logits per token")
    hard_label_weight: float = Field(0.0, ge=0, le=1, description="weight of cross-entropy on the tokens")
    on_policy_frac: float = Field(0.0, ge=0, le=1, description="fraction of steps on student samples")
    max_new_tokens: int = Field(8, ge=1, description="on-policy: tokens sampled per prompt")
    sampling_temperature: float = Field(1.0, gt=0, description="on-policy: the student's temperature")


class DistillConfig(LoopConfig):
    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/distill"))
    teacher: SourceModelConfig
    student: StudentConfig
    data: SFTDataConfig = Field(default_factory=lambda: SFTDataConfig(synthetic=SFTSyntheticConfig()))
    eval: SFTEvalConfig = Field(default_factory=SFTEvalConfig)
    algorithm: DistillAlgorithmConfig = Field(default_factory=DistillAlgorithmConfig)
    quantize: QATConfig | None = Field(None, description="QAT of the student (algorithms/qat.py)")


# ---------------------------------------------------------------------------------------------- inputs


def same_tokenizer(a: Any, b: Any) -> bool:
    """The same ids for the same strings and the same special tokens and chat template."""
    specials = ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template")
    return a.get_vocab() == b.get_vocab() and all(getattr(a, k) == getattr(b, k) for k in specials)


def student_source(cfg: DistillConfig, teacher_tokenizer: Any, teacher_dir: Path) -> tuple[Any, Any]:
    """(the student's init source or None, its TransformerConfig); InputError when its tokenizer or
    vocabulary is not the teacher's, or layers_from_teacher does not fit the teacher."""
    from algorithms.rl_inputs import init_config, resolve_init
    from core.data.tokenizer import load_tokenizer

    teacher_config = init_config(resolve_init(cfg.teacher.init_from))
    student = cfg.student
    if student.init_from is not None:
        source = resolve_init(student.init_from)
        if source.tokenizer is not None and not same_tokenizer(
            load_tokenizer(source.tokenizer), teacher_tokenizer
        ):
            raise InputError(
                f"student.init_from ({student.init_from}) has another tokenizer ({source.tokenizer}) than the "
                f"teacher's ({teacher_dir}): distillation compares logits id by id, so both must share one"
            )
        config = init_config(source)
    elif student.layers_from_teacher is not None:
        source, layers = None, student.layers_from_teacher
        bad = [i for i in layers if not 0 <= i < teacher_config.num_layers]
        if bad or len(set(layers)) != len(layers):
            raise InputError(
                f"student.layers_from_teacher={layers}: distinct indices of the teacher's "
                f"{teacher_config.num_layers} layers (0..{teacher_config.num_layers - 1})"
            )
        config = dataclasses.replace(teacher_config, num_layers=len(layers))
    else:
        source = None
        fields = {"vocab_size": teacher_config.vocab_size} if student.vocab_size is None else {}
        config = dataclasses.replace(student.transformer_config(teacher_config.vocab_size), **fields)
    if config.vocab_size != teacher_config.vocab_size:
        raise InputError(
            f"the student's vocab_size={config.vocab_size} differs from the teacher's "
            f"{teacher_config.vocab_size}: distillation compares logits id by id"
        )
    return source, config


def check_for_run(cfg: DistillConfig) -> None:
    """Every input, before anything is written: both models and their tokenizers (one tokenizer), every
    data row, the example lengths and the parallel layout for both models."""
    from algorithms.rl_inputs import init_config

    teacher, tokenizer, tokenizer_dir = source_tokenizer(cfg.teacher)
    _, student_config = student_source(cfg, tokenizer, tokenizer_dir)
    check_sft_data(cfg, tokenizer)
    cfg.parallel.check_model(init_config(teacher))
    cfg.parallel.check_model(student_config)
    check_resume(cfg.run.dir, DistillTrainer.stage, student_config)


# ------------------------------------------------------------------------------------------------ losses


def distill_loss(tp_group: Any, n_tokens: torch.Tensor, algo: DistillAlgorithmConfig):
    """loss_fn for the schedules: the micro-batch's share of the step's mean per-token loss
    (1 - w) * divergence(student, teacher) + w * cross-entropy(labels), w = hard_label_weight, over the
    loss_mask tokens; micro-batches carry teacher_logits (B, T, V/tp) next to labels and loss_mask (B, T)."""

    def loss_fn(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
        divergence = vocab_parallel_divergence(
            logits, mb["teacher_logits"], algo.loss, tp_group, algo.temperature, algo.beta, algo.top_k
        )  # (B, T) fp32
        ce = vocab_parallel_cross_entropy(logits, mb["labels"], tp_group)  # (B, T) fp32
        w, mask = algo.hard_label_weight, mb["loss_mask"]
        per_token = divergence if w == 0 else (1 - w) * divergence + w * ce
        loss_sum = (per_token * mask).sum()
        correct = vocab_parallel_token_correct(logits, mb["labels"], tp_group)  # (B, T)
        metrics = {
            "loss_sum": loss_sum.detach(),
            "divergence_sum": (divergence * mask).sum().detach(),
            "ce_sum": (ce * mask).sum().detach(),
            "correct_sum": (correct * mask).sum(),
        }
        return loss_sum / n_tokens, metrics

    return loss_fn


def kl_to_teacher(tp_group: Any):
    """loss_fn (forward only): the sum of KL(teacher || student) at temperature 1 over loss_mask tokens."""

    def loss_fn(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
        kl = vocab_parallel_divergence(logits, mb["teacher_logits"], "forward_kl", tp_group)  # (B, T)
        return logits.new_zeros(()), {"kl_sum": (kl * mb["loss_mask"]).sum()}

    return loss_fn


def _logits_out(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
    return logits.new_zeros(()), {"logits": logits}


# ------------------------------------------------------------------------------------------------- loop


class DistillTrainer(PackedLMTrainer):
    """One rank of a distillation run (see the module docstring)."""

    stage: ClassVar[str] = "distill"
    shown: ClassVar[tuple[str, ...]] = ("train/divergence", "eval/kl", "eval/accuracy")
    plotted: ClassVar[tuple[str, ...]] = ("train/loss", "train/divergence", "eval/kl", "eval/accuracy")
    config_schema: ClassVar[type] = DistillConfig

    def prepare(self) -> None:
        from algorithms.rl_inputs import PromptLoader

        cfg = self.cfg
        self.teacher_source, self.tokenizer, self._tokenizer_dir = source_tokenizer(cfg.teacher)
        self.student_source, self.student_config = student_source(cfg, self.tokenizer, self._tokenizer_dir)
        rows, self.dataset, self.eval_rows, self.eval_examples, self.synthetic = sft_data(
            cfg, self.tokenizer, self.run_dir
        )
        self.prompts = PromptLoader([r for r, _ in rows], cfg.train.global_batch_size, cfg.train.seed)
        self._teacher_full: GPTModel | None = None

    def initial_model(self) -> tuple[GPTModel, Any]:
        """The student (the teacher is built next to it in build_engine)."""
        from algorithms.rl_inputs import init_arch_name, load_init

        if self.student_source is not None:
            return load_init(self.student_source)
        layers = self.cfg.student.layers_from_teacher
        torch.manual_seed(self.cfg.train.seed)  # every rank and layout starts from the same weights
        student = GPTModel(self.student_config)
        if layers is None:
            return student, None
        teacher = self.teacher_model().state_dict()
        state = {k: v for k, v in teacher.items() if not k.startswith("layers.")}
        for new, old in enumerate(layers):
            prefix = f"layers.{old}."
            state |= {
                f"layers.{new}.{k[len(prefix) :]}": v for k, v in teacher.items() if k.startswith(prefix)
            }
        student.load_state_dict(state, strict=False)
        return student, init_arch_name(self.teacher_source)

    def teacher_model(self) -> GPTModel:
        """The whole teacher on the CPU in fp32, loaded once (dropped once its engine is built)."""
        from algorithms.rl_inputs import load_init_model

        if self._teacher_full is None:
            self._teacher_full = load_init_model(self.teacher_source)
        return self._teacher_full

    def build_engine(self, full: GPTModel):
        from core.engine import ModelEngine
        from core.utils.device import param_dtype

        engine = super().build_engine(full)
        cfg, teacher = self.cfg, self.teacher_model()
        # A frozen engine at the same layout, forward only: its optimizer is never stepped (as DPO's
        # batch reference). The teacher's logits are then vocab-sharded exactly like the student's.
        self.teacher = ModelEngine(
            teacher.config,
            cfg.parallel,
            cfg.optim,
            self.groups,
            self.device,
            teacher.state_dict(),
            param_dtype(cfg.precision, self.device, allow_fp16=True),
        )
        self._teacher_full = None
        self.setup_batches(self.dataset, cfg.data.seq_len)
        return engine

    @property
    def tokenizer_dir(self) -> Path:
        return self._tokenizer_dir

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_rows)

    # ---- the step: data (off- or on-policy) -> teacher logits -> student forward/backward ----------------

    def with_teacher_logits(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Adds the teacher's vocab-sharded logits (B, T, V/tp) to each micro-batch, on the last stage."""
        outputs = self.teacher.forward_collect(micro_batches, _logits_out)
        for mb, out in zip(micro_batches, outputs, strict=False):  # no outputs on earlier stages
            mb["teacher_logits"] = out["logits"]

    def is_on_policy(self) -> bool:
        """The same draw on every rank and on resume: seeded by (seed, step)."""
        frac = self.cfg.algorithm.on_policy_frac
        return frac > 0 and random.Random(self.cfg.train.seed * 1_000_003 + self.step_count).random() < frac

    def on_policy_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This dp rank's micro-batches of (prompt + the student's sampled response), loss on the response
        (and its EOS). Every rank draws the step's prompts; pp > 1: rank 0 samples and broadcasts."""
        from algorithms.alignment_inputs import eval_prompt

        algo, tok = self.cfg.algorithm, self.tokenizer
        prompts = [eval_prompt(tok, row)[0] for _, row in self.prompts.next_batch()]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        samples = self.greedy_generate(prompts, algo.max_new_tokens, eos, algo.sampling_temperature)
        if self.groups is not None and self.groups.pp_size > 1:
            import torch.distributed as dist

            box = [samples]
            dist.broadcast_object_list(box, src=0)
            samples = box[0]
        dp_rank, dp_size = self.dp_rank_size
        per_rank = len(prompts) // dp_size
        rows, masks = [], []
        for p, s in list(zip(prompts, samples, strict=True))[dp_rank * per_rank : (dp_rank + 1) * per_rank]:
            response = s + eos[:1] if len(s) < algo.max_new_tokens else s  # it stopped on EOS
            rows.append(p + response)
            masks.append([0] * len(p) + [1] * len(response))
        batch = right_padded_batch(rows, masks, 2 * self.cfg.parallel.cp)
        size = self.cfg.train.micro_batch_size
        return [
            {k: v[i : i + size].to(self.device) for k, v in batch.items()} for i in range(0, len(rows), size)
        ]

    def step(self) -> dict[str, float]:
        on_policy = self.is_on_policy()
        if on_policy:
            micro_batches = self.on_policy_micro_batches()
        else:
            micro_batches = [
                {k: v.to(self.device) for k, v in next(self.batches).items()} for _ in range(self.grad_accum)
            ]
        self.with_teacher_logits(micro_batches)
        n_tokens = torch.stack([mb["loss_mask"].sum() for mb in micro_batches]).sum().to(torch.float64)
        n_tokens = self.all_reduce(n_tokens).clamp(min=1.0)
        lr = self.lr
        loss_fn = distill_loss(self.tp_group, n_tokens.float(), self.cfg.algorithm)
        sums, grad_norm, step_metrics = self.train_step(
            micro_batches, loss_fn, ("loss_sum", "divergence_sum", "ce_sum", "correct_sum")
        )
        self.tokens_seen += int(n_tokens)
        self._window_tokens += int(n_tokens)
        n = float(n_tokens)
        metrics = {
            "train/loss": sums["loss_sum"] / n,
            "train/divergence": sums["divergence_sum"] / n,
            "train/ce": sums["ce_sum"] / n,
            "train/token_accuracy": sums["correct_sum"] / n,
            "train/on_policy": float(on_policy),
            "train/lr": lr,
        }
        if not step_metrics.get("skipped"):
            metrics["train/grad_norm"] = grad_norm
        return metrics

    # ---- evaluation -------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out KL(teacher || student) and response loss; task accuracy by greedy generation."""
        if not self.eval_rows:
            return {}
        rows = [e.input_ids for e in self.eval_examples]
        masks = [e.loss_mask for e in self.eval_examples]
        mbs, total = self.held_out_micro_batches(rows, masks)
        self.with_teacher_logits(mbs)
        kl_sum = self.engine.forward_only(mbs, kl_to_teacher(self.tp_group), "kl_sum")
        metrics = {"eval/kl": kl_sum / max(total, 1.0), "eval/loss": self.held_out_loss(rows, masks)}
        acc = self.answer_accuracy(
            [r for r, _ in self.eval_rows], self.cfg.eval.max_new_tokens, self.synthetic
        )
        if acc is not None:
            metrics["eval/accuracy"] = acc
        return metrics

    def loop_state(self) -> dict[str, Any]:
        return {**super().loop_state(), "prompts": self.prompts.state_dict()}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        super().load_loop_state(state)
        self.prompts.load_state_dict(state["prompts"])


def run_distill(cfg: DistillConfig) -> dict[str, float]:
    """Checks every input, then distills to train.max_steps (resuming from run.dir) and exports hf/."""
    from algorithms.engine_trainer import run_spmd

    check_for_run(cfg)
    return run_spmd(DistillTrainer, cfg)
