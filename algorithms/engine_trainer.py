"""EngineTrainer: the shared trainer for loops whose every rank trains one ModelEngine (SPMD): pretrain,
SFT, DPO, reward models. Any tp x pp x dp x cp layout; the same code on one process.

A loop subclass supplies its data (`prepare`), the full initial model (`initial_model`), its step and its
evaluation; this class builds the engine (bf16/fp16/fp8 precision, optional LoRA, per-layer compile),
the LR schedule, checkpoints of engine + schedule (DCP: they load at any other layout), the hf/ export
and greedy generation through the native engine for task accuracy at every layout. With a `quantize:`
section (algorithms/qat.py) the engine's model trains through ModelOpt's fake quantizers: they are
inserted and calibrated in build_engine, checkpointed next to the model and exported to quantized/.

Launch (`run_spmd`): one process when parallel.world_size == 1, else the ranks are spawned here with
torch.distributed (gloo on CPU, NCCL on GPU), or placed on a Ray worker group when the config has a
`placement` (rl/ provides that runner); every rank builds the same trainer.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from algorithms.schedules import build_scheduler, lr_at
from algorithms.trainer import Trainer, model_meta
from core.data.pretrain_dataset import PretrainBatches
from core.engine import ModelEngine
from core.parallel.dims import Groups
from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_token_correct
from core.transformer.model import GPTModel
from core.utils.device import param_dtype, resolve_device
from core.utils.flops import flops_per_token, peak_flops

if TYPE_CHECKING:
    from algorithms.qat import QATConfig


class EngineTrainer(Trainer):
    """One rank of an SPMD loop over a ModelEngine (see the module docstring)."""

    config_schema: ClassVar[type]  # the loop's config schema (ranks rebuild the config from a dict)

    def __init__(self, cfg: Any, groups: Groups | None = None, rank: int = 0) -> None:
        super().__init__(cfg, is_logger=rank == 0, distributed=groups is not None)
        self.groups, self.rank = groups, rank
        self.device = resolve_device(cfg.train.device, rank)
        self.prepare()
        full, self.arch = self.initial_model()
        # FP8 is how the training chunks compute, not part of the architecture: the full CPU model, the
        # checkpoints and the exports stay fp8="off".
        self.config = dataclasses.replace(full.config, fp8=getattr(cfg.precision, "fp8", "off"))
        self.engine = self.build_engine(full)
        del full
        self.scheduler = build_scheduler(self.engine.optimizer, cfg.train.max_steps, cfg.optim)
        self._engine_for_eval: Any = None
        self._eval_len = 0
        torch.manual_seed(cfg.train.seed + rank)
        self.maybe_resume()

    # ---- what a loop supplies (besides step / evaluate) ------------------------------------------------

    def prepare(self) -> None:
        """Read the loop's data (tokenizer, datasets) before the model is built."""

    def initial_model(self) -> tuple[GPTModel, Any]:
        """(the whole initial model on the CPU in fp32, its HF architecture or None)."""
        raise NotImplementedError

    def build_engine(self, full: GPTModel) -> ModelEngine:
        cfg = self.cfg
        fp16 = cfg.precision.dtype == "fp16"
        scaler = None
        if fp16:
            from core.distributed import DynamicGradScaler

            p = cfg.precision
            scaler = DynamicGradScaler(p.initial_loss_scale, growth_interval=p.loss_scale_window)
        engine = ModelEngine(
            self.config,
            cfg.parallel,
            cfg.optim,
            self.groups,
            self.device,
            full.state_dict(),
            param_dtype(cfg.precision, self.device, allow_fp16=True),
            grad_scaler=scaler,
            compile_layers=cfg.train.compile,
            recompute=cfg.train.recompute,
            **self.engine_extras(),
        )
        if self.qat is not None:  # before any checkpoint loads: a resume then restores the quantizers too
            self.insert_quantizers(engine)
        return engine

    def engine_extras(self) -> dict[str, Any]:
        """Extra ModelEngine keywords (LoRA)."""
        lora = getattr(self.cfg, "lora", None)
        return {"lora": lora} if lora is not None else {}

    def calibration_micro_batches(self, samples: int) -> list[dict[str, torch.Tensor]]:
        """QAT: the first `samples` training rows of the loop's order, in micro-batches on this device,
        the same on every rank (so every replica calibrates the same scales)."""
        raise NotImplementedError(f"{type(self).__name__} has no QAT calibration data")

    # ---- quantization-aware training (algorithms/qat.py) ----------------------------------------------

    @property
    def qat(self) -> QATConfig | None:
        """The config's `quantize:` section, or None."""
        from algorithms.qat import QATConfig

        qat = getattr(self.cfg, "quantize", None)
        return qat if isinstance(qat, QATConfig) else None

    def insert_quantizers(self, engine: ModelEngine) -> None:
        """QAT: the format's quantizers into the engine's linears, calibrated on the loop's first rows."""
        from algorithms.qat import check_qat, insert_quantizers
        from algorithms.quantize import check_blocks

        check_qat(self.cfg)  # again here: ranks placed on Ray do not pass through run_spmd
        check_blocks(self.qat.format, self.config, "quantize.format")
        insert_quantizers(
            engine, self.qat.format, self.calibration_micro_batches(self.qat.calibration_samples)
        )

    def write_quantized(self, path: Path) -> None:
        """quantized/: the unified HF checkpoint and modelopt_state.pth of the QAT'd model (collective)."""
        from algorithms.qat import export_quantized, quantizer_state

        model = self.whole_model()
        if model is not None:
            state = quantizer_state(self.engine.chunks)
            export_quantized(model, state, self.qat.format, self.arch, self.tokenizer_dir, path)

    # ---- shared pieces ----------------------------------------------------------------------------------

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.groups.tp_group if self.groups else None

    @property
    def dp_rank_size(self) -> tuple[int, int]:
        return (self.groups.dp_rank, self.groups.dp_size) if self.groups else (0, 1)

    def all_reduce(self, x: torch.Tensor, group_name: str = "dp_group") -> torch.Tensor:
        if self.groups is not None:
            dist.all_reduce(x, group=getattr(self.groups, group_name))
        return x

    def train_step(
        self,
        micro_batches: list[dict[str, torch.Tensor]],
        loss_fn: Any,
        sums: tuple[str, ...] = ("loss_sum",),
    ) -> tuple[dict[str, float], float, dict[str, float]]:
        """One optimizer step through the engine, then the LR schedule. Returns (the loss_fn metrics `sums`
        summed over micro-batches and ranks, the grad norm before clipping, the engine's step metrics).
        A non-finite loss_sum or grad norm skips the update on every rank (ModelEngine.optimizer_step)."""
        per_mb = self.engine.forward_backward(micro_batches, loss_fn)
        self.engine.finalize_grads()
        reduced = {key: self.engine.reduce_metric(per_mb, key) for key in sums}
        grad_norm, metrics = self.engine.optimizer_step(self.cfg.optim.clip_grad, reduced.get("loss_sum"))
        # An fp16 step skipped on overflow still advances the LR schedule: the LR stays a function of the
        # step (what a resume recomputes). torch warns when that happens before any optimizer.step().
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        return reduced, grad_norm, metrics

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ---- checkpoints ------------------------------------------------------------------------------------

    def save_model(self, path: Path) -> None:
        # through the manager: with train.async_save the write runs in the background
        self.checkpoints.write_state(self.engine.sharded_state(), path / "model")
        if self.qat is not None:
            from algorithms.qat import quantizer_state

            self.checkpoints.write_state(quantizer_state(self.engine.chunks), path / "quantizers")

    def state_finite(self) -> bool:
        return self.engine.state_finite()

    def checkpoint_bytes(self) -> int:
        from core.checkpoint.checkpointer import estimate_checkpoint_bytes

        with torch.device("meta"):  # the whole model's parameter count, nothing allocated
            whole = GPTModel(dataclasses.replace(self.config, fp8="off"))
        n_params = sum(p.numel() for p in whole.parameters())
        local = [p for chunk in self.engine.chunks for p in chunk.parameters()]
        trained = sum(p.numel() for p in local if p.requires_grad) / max(1, sum(p.numel() for p in local))
        return estimate_checkpoint_bytes(n_params, local[0].element_size(), int(n_params * trained))

    def load_model(self, path: Path) -> None:
        template = self.engine.load_template(path / "model")
        dcp.load(template, checkpoint_id=str(path / "model"))
        self.engine.finish_load(template)
        if self.qat is not None:
            from algorithms.qat import quantizer_state
            from core.errors import InputError

            if not (path / "quantizers").is_dir():
                raise InputError(f"{path} has no quantizers/: a checkpoint of a run without quantize:")
            dcp.load(quantizer_state(self.engine.chunks), checkpoint_id=str(path / "quantizers"))

    def loop_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.engine.grad_scaler is not None:
            state["grad_scaler"] = self.engine.grad_scaler.state_dict()
        return state

    def load_loop_state(self, state: dict[str, Any]) -> None:
        # The LR follows the current config's schedule at the restored step (Megatron does the same), so a
        # run resumed with a larger train.max_steps continues on the new schedule, not the stored one.
        step = int(state["step"])
        lr = lr_at(step, self.cfg.train.max_steps, self.cfg.optim)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.scheduler.last_epoch = step
        self.scheduler._last_lr = [lr for _ in self.engine.optimizer.param_groups]
        if self.engine.grad_scaler is not None and "grad_scaler" in state:
            self.engine.grad_scaler.load_state_dict(state["grad_scaler"])

    def meta(self) -> dict[str, Any]:
        meta = model_meta(self.config, self.arch)
        lora = getattr(self.cfg, "lora", None)
        if lora is not None:  # checkpoints hold base weights + adapters: the next stage merges them
            meta["lora"] = lora.model_dump(mode="json")
        if self.qat is not None:  # a record: the weights in model/ are the plain model's all the same
            meta["quantize"] = self.qat.model_dump(mode="json")
        return meta

    def export(self) -> Path:
        """hf/ (adapters merged); with LoRA also adapter/ in PEFT's format (adapter_config.json +
        adapter_model.safetensors, for `PeftModel.from_pretrained` on the transformers model); with QAT
        also quantized/ (write_quantized)."""
        from algorithms.trainer import publish_dir

        out = super().export()
        if getattr(self.cfg, "lora", None) is not None:
            publish_dir(self.run_dir / "adapter", self.write_peft, self.is_logger)
        if self.qat is not None:
            publish_dir(self.run_dir / "quantized", self.write_quantized, self.is_logger)
        return out

    def write_peft(self, path: Path) -> None:
        from core.bridge.peft import write_peft_adapter

        write_peft_adapter(self.engine.chunks, self.groups, self.config, self.arch, path, self.cfg.lora)

    # ---- the whole model: export and generation -------------------------------------------------------

    def full_weights(self):
        """(our global name, FULL tensor) of the whole model on global rank 0, one at a time (collective:
        every rank drives it; other ranks get nothing). Merged LoRA adapters when the engine has them."""
        from rollout.refit import gather_full_params, gather_to_rank0_over_pp

        with self.engine.merged_weights():
            stream = gather_to_rank0_over_pp(gather_full_params(self.engine.chunks, self.groups), self.groups)
            for name, tensor in stream:
                if self.rank == 0:
                    yield name, tensor

    def whole_model(self) -> GPTModel | None:
        """The whole model on global rank 0 (fp32 CPU copy; collective), None elsewhere."""
        state = {name: t.detach().float().cpu().clone() for name, t in self.full_weights()}
        if self.rank != 0:
            return None
        model = GPTModel(dataclasses.replace(self.config, fp8="off"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq") and k not in _tied_names(model)]
        if missing or unexpected:
            raise RuntimeError(f"whole_model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model

    def write_hf(self, path: Path) -> None:
        model = self.whole_model()
        if model is not None:
            from core.bridge import save_hf

            save_hf(model, path, arch=self.arch, tokenizer_dir=self.tokenizer_dir)

    def answer_accuracy(self, rows: list[dict[str, Any]], max_tokens: int, arithmetic: bool) -> float | None:
        """Fraction of held-out rows (with an "answer") whose greedy completion is right, on rank 0 (None
        elsewhere, or without such rows): the arithmetic verifier for the embedded task, else exact match."""
        from algorithms.alignment_inputs import eval_prompt
        from core.data.synthetic import score_arithmetic

        rows = [r for r in rows if "answer" in r]
        if not rows:
            return None
        tok = self.tokenizer
        prompts, texts = zip(*(eval_prompt(tok, r) for r in rows), strict=True)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        out = self.greedy_generate(list(prompts), max_tokens, eos)
        if self.rank != 0:
            return None
        decoded = tok.batch_decode(out, skip_special_tokens=True)
        correct = [
            score_arithmetic(t, d) if arithmetic else d.strip() == str(r["answer"]).strip()
            for r, t, d in zip(rows, texts, decoded, strict=True)
        ]
        return sum(correct) / len(rows)

    def greedy_generate(
        self, prompts: list[list[int]], max_tokens: int, eos_ids: list[int], temperature: float = 0.0
    ) -> list[list[int]]:
        """Greedy completions (token ids, EOS dropped) through the native engine, at any layout; sampled at
        `temperature` when it is > 0 (on-policy distillation).

        pp = 1: every rank runs the engine on its own training chunk (tp ranks together, no copy).
        pp > 1: the whole model is gathered to rank 0, which generates; other ranks return [].
        """
        from rollout.engines.native import NativeEngine
        from rollout.types import GenerationRequest, SamplingParams

        sharded = self.groups is None or self.groups.pp_size == 1
        model = self.engine.chunks[0] if sharded else self.whole_model()
        if model is None:
            return []
        longest = max(len(p) for p in prompts) + max_tokens
        if self._engine_for_eval is None or self._eval_len < longest or not sharded:
            if self._engine_for_eval is not None:
                self._engine_for_eval.shutdown()
            self._eval_len = min(self.config.max_position_embeddings, max(longest, 64))
            self._engine_for_eval = NativeEngine(
                model.to(self.device) if not sharded else model,
                max_model_len=self._eval_len,
                max_num_seqs=max(1, min(len(prompts), 256)),
                seed=self.cfg.train.seed,
                tp_group=self.tp_group if sharded else None,
                eos_token_ids=eos_ids,
                arch=self.arch,
            )
        engine = self._engine_for_eval
        was_training = [c.training for c in self.engine.chunks]
        params = SamplingParams(n=1, temperature=temperature, max_tokens=max_tokens)
        try:
            results = engine.generate(
                [GenerationRequest(p, params, request_id=str(i)) for i, p in enumerate(prompts)]
            )
        finally:
            for c, mode in zip(self.engine.chunks, was_training):
                c.train(mode)
        out = []
        for r in results:
            ids = list(r.samples[0].token_ids)
            out.append([t for t in ids if t not in eos_ids])
        return out


def next_token_loss(tp_group, n_tokens: torch.Tensor):
    """loss_fn for the schedules: the micro-batch's token-loss sum over the step's global token count.
    Batches: input_ids, labels, loss_mask (B, T), optionally position_ids / segment_ids (packed rows)."""

    def loss_fn(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
        per_token = vocab_parallel_cross_entropy(logits, mb["labels"], tp_group)  # (B, T) fp32
        loss_sum = (per_token * mb["loss_mask"]).sum()
        correct = vocab_parallel_token_correct(logits, mb["labels"], tp_group)  # (B, T)
        metrics = {
            "loss_sum": loss_sum.detach(),
            "tokens": mb["loss_mask"].sum(),
            "correct_sum": (correct * mb["loss_mask"]).sum(),
        }
        return loss_sum / n_tokens, metrics

    return loss_fn


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def right_padded_batch(
    rows: list[list[int]], masks: list[list[int]], multiple: int
) -> dict[str, torch.Tensor]:
    """Full sequences (ids, target mask per token) as one next-token batch of B rows, right-padded with id 0
    (loss 0 there, which causal attention never lets earlier tokens see) to T positions, a multiple of
    `multiple`: input_ids, labels, loss_mask, position_ids, segment_ids (B, T)."""
    width = round_up(max(map(len, rows)) - 1, multiple) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r) - 1] = torch.tensor(m[1:], dtype=torch.float32)
    B, T = ids.shape[0], width - 1
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "loss_mask": mask,
        "position_ids": torch.arange(T).expand(B, T),
        "segment_ids": torch.zeros(B, T, dtype=torch.long),
    }


class PackedLMTrainer(EngineTrainer):
    """A next-token loop over packed rows (pretrain, SFT): the step, throughput metrics, held-out loss."""

    def packed_step(self, batches: PretrainBatches, drop_packing: bool = False) -> dict[str, float]:
        # Without per-document attention the model builds positions itself and runs plain causal attention.
        dropped = ("segment_ids", "position_ids") if drop_packing else ()
        micro_batches = [
            {k: v.to(self.device) for k, v in next(batches).items() if k not in dropped}
            for _ in range(self.grad_accum)
        ]
        n_tokens = torch.stack([mb["loss_mask"].sum() for mb in micro_batches]).sum().to(torch.float64)
        n_tokens = self.all_reduce(n_tokens).clamp(min=1.0)
        lr = self.lr
        sums, grad_norm, step_metrics = self.train_step(
            micro_batches, next_token_loss(self.tp_group, n_tokens.float()), ("loss_sum", "correct_sum")
        )
        self.tokens_seen += int(n_tokens)
        self._window_tokens += int(n_tokens)
        metrics = {
            "train/loss": sums["loss_sum"] / float(n_tokens),
            "train/token_accuracy": sums["correct_sum"] / float(n_tokens),
            "train/lr": lr,
        }
        if "loss_scale" in step_metrics:
            self.skipped_steps += int(step_metrics["skipped"])
            metrics |= {
                "train/loss_scale": step_metrics["loss_scale"],
                "train/skipped_steps": self.skipped_steps,
            }
        if not step_metrics.get("skipped"):  # an overflowed step has no finite gradient norm
            metrics["train/grad_norm"] = grad_norm
        return metrics

    def setup_throughput(self, seq_len: int) -> None:
        """MFU on GPUs with a known peak: model FLOPs of the tokens trained over every GPU's peak."""
        import time

        groups = self.groups
        world = groups.mp_size * groups.dp_cp_size if groups else 1  # tp * pp * dp * cp ranks
        peak = peak_flops(self.device)
        self._flops_per_token = flops_per_token(self.config, seq_len)
        self._peak_total = peak * world if peak else None
        self.tokens_seen, self.skipped_steps = 0, 0
        self._window_tokens, self._window_start = 0, time.perf_counter()

    def log_extras(self) -> dict[str, float]:
        import time

        elapsed = time.perf_counter() - self._window_start
        extras = {"perf/tokens_per_s": self._window_tokens / max(elapsed, 1e-9)}
        if self._peak_total:
            extras["perf/mfu"] = extras["perf/tokens_per_s"] * self._flops_per_token / self._peak_total
        extras["train/tokens_seen"] = self.tokens_seen
        self._window_tokens, self._window_start = 0, time.perf_counter()
        return extras

    def held_out_loss(self, rows: list[list[int]], masks: list[list[int]]) -> float:
        """Mean token loss of full sequences (ids, target mask per token) at any layout."""
        mbs, total = self.held_out_micro_batches(rows, masks)
        loss_sum = self.engine.forward_only(
            mbs, next_token_loss(self.tp_group, torch.tensor(1.0)), "loss_sum"
        )
        return loss_sum / max(total, 1.0)

    def held_out_micro_batches(
        self, rows: list[list[int]], masks: list[list[int]]
    ) -> tuple[list[dict[str, torch.Tensor]], float]:
        """(the sequences right-padded (right_padded_batch) and split into pp micro-batches so any schedule
        can run them, their target-token count times dp): every dp rank evaluates the same rows and
        forward_only sums over dp, so a mean divides the sum by that count."""
        batch = right_padded_batch(rows, masks, 2 * self.cfg.parallel.cp)
        B = batch["input_ids"].shape[0]
        mbs = [
            {k: v[idx].to(self.device) for k, v in batch.items()}
            for idx in torch.arange(B).tensor_split(min(B, self.cfg.parallel.pp))
        ]
        return mbs, float(batch["loss_mask"].sum()) * (self.groups.dp_size if self.groups else 1)

    def calibration_micro_batches(self, samples: int) -> list[dict[str, torch.Tensor]]:
        """The first `samples` packed rows of the training order (self.dataset, read by a fresh sampler:
        the run's own batches do not move)."""
        batches = PretrainBatches(self.dataset, self.cfg.train.micro_batch_size, self.cfg.train.seed)
        out: list[dict[str, torch.Tensor]] = []
        while samples > 0:
            mb = {k: v[:samples].to(self.device) for k, v in next(batches).items()}
            samples -= mb["input_ids"].shape[0]
            out.append(mb)
        return out

    def setup_batches(self, dataset: Any, seq_len: int) -> None:
        """This dp rank's resumable micro-batches of the packed dataset, and the throughput counters."""
        cfg = self.cfg
        dp_rank, dp_size = self.dp_rank_size
        self.grad_accum = cfg.train.grad_accum_steps(dp_size)
        self.batches = PretrainBatches(
            dataset, cfg.train.micro_batch_size, cfg.train.seed, dp_rank=dp_rank, dp_size=dp_size
        )
        self.setup_throughput(seq_len)

    def loop_state(self) -> dict[str, Any]:
        return {**super().loop_state(), "tokens_seen": self.tokens_seen, "data": self.batches.state_dict()}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        super().load_loop_state(state)
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.batches.load_state_dict(state["data"])


def _tied_names(model: GPTModel) -> set[str]:
    """Parameter names that alias another (a tied output head) and so never appear in a gathered stream."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


# ---- launching every rank -----------------------------------------------------------------------------


def run_spmd(trainer_cls: type[EngineTrainer], cfg: Any) -> dict[str, float]:
    """Write config.yaml, then train to train.max_steps (resuming from run.dir), export hf/ and plot, on
    one process or on parallel.world_size spawned ranks. The caller has checked every input already but
    the `quantize:` section (algorithms/qat.py), checked here first."""
    from algorithms.qat import check_qat
    from core.config import dump_config
    from core.parallel.launch import launch
    from core.utils.metrics import read_metrics

    check_qat(cfg)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    if cfg.parallel.world_size == 1:
        return train_rank(trainer_cls, cfg)
    import torch.multiprocessing as mp

    from core.parallel.heartbeat import hang_policy

    path, hang = f"{trainer_cls.__module__}:{trainer_cls.__qualname__}", hang_policy(cfg.failure)
    try:
        launch(_rank_main, cfg.parallel.world_size, path, cfg.model_dump(mode="json"), hang=hang)
    except mp.ProcessRaisedException as e:
        one_line = _one_line_error(str(e))
        if one_line is not None:  # every rank sees the same global loss / input: one says it for all
            raise one_line from None
        raise
    rows = read_metrics(run_dir)
    return rows[-1] if rows else {}


def train_rank(trainer_cls: type[EngineTrainer], cfg: Any, groups: Groups | None = None, rank: int = 0):
    """This rank's whole run: build (resuming), fit, export, plot. Returns the last logged metrics."""
    from core.parallel.heartbeat import beat

    trainer = trainer_cls(cfg, groups, rank)
    try:
        metrics = trainer.fit()
        beat("export", trainer.step_count)
        trainer.export()
        trainer.plot()
        beat("done", trainer.step_count)
    finally:
        trainer.close()
    return metrics


def _one_line_error(trace: str) -> Exception | None:
    """The error a rank raised, when it is one of those the CLI reports in one line (and never restarts):
    a diverged run, bad input, a storage failure."""
    from algorithms.trainer import RunDiverged
    from core.errors import InputError, StorageError

    for cls in (RunDiverged, InputError, StorageError):
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        lines = [line for line in trace.splitlines() if line.startswith(prefix)]
        if lines:
            return cls(lines[-1].removeprefix(prefix))
    return None


def trainer_class(path: str) -> type[EngineTrainer]:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _rank_main(rank: int, world_size: int, trainer_path: str, cfg_dict: dict[str, Any]) -> None:
    import os

    from core.parallel.dims import build_groups

    trainer_cls = trainer_class(trainer_path)
    cfg = trainer_cls.config_schema.model_validate(cfg_dict)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    groups = build_groups(cfg.parallel.dims(), rank)
    train_rank(trainer_cls, cfg, groups, rank)
    dist.barrier()


class PairTrainer(EngineTrainer):
    """What the loops over preference pairs (dpo, rm) share: the model source and its tokenizer, the
    train / held-out pairs, a resumable seeded order over them and this dp rank's slice of each step."""

    def prepare(self) -> None:
        from algorithms.alignment_inputs import pair_paths, source_tokenizer
        from algorithms.rl_inputs import PromptLoader
        from core.data.alignment import build_preference_examples, read_rows

        cfg = self.cfg
        self.source, self.tokenizer, self._tokenizer_dir = source_tokenizer(cfg.model)
        train, held_out = pair_paths(cfg)

        def build(rows: list) -> list:
            return build_preference_examples(rows, self.tokenizer, cfg.data.max_len, cfg.data.truncation)

        self.rows = read_rows(train)
        self.examples = build(self.rows)
        self.eval_rows = read_rows(held_out)[: cfg.eval.num_pairs] if held_out is not None else []
        self.eval_examples = build(self.eval_rows)
        dp_size = self.groups.dp_size if self.groups else 1
        cfg.train.grad_accum_steps(dp_size)
        self.pairs_per_rank = cfg.train.global_batch_size // dp_size
        indices = list(range(len(self.examples)))
        self.loader = PromptLoader(indices, cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)

    def initial_model(self) -> tuple[GPTModel, Any]:
        from algorithms.rl_inputs import load_init

        return load_init(self.source)

    @property
    def tokenizer_dir(self) -> Path:
        return self._tokenizer_dir

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_examples)

    def next_micro_batches(self) -> tuple[int, list[list[int]]]:
        """(pairs in the global step, this dp rank's pair indices split into micro-batches)."""
        indices = [i for i, _ in self.loader.next_batch()]  # the global batch, the same on every rank
        dp_rank = self.groups.dp_rank if self.groups else 0
        mine = indices[dp_rank * self.pairs_per_rank : (dp_rank + 1) * self.pairs_per_rank]
        size = self.cfg.train.micro_batch_size
        return len(indices), [mine[i : i + size] for i in range(0, len(mine), size)]

    def calibration_micro_batches(self, samples: int) -> list[dict[str, torch.Tensor]]:
        """The first `samples` pairs of the training order, as chosen/rejected rows right-padded per
        micro-batch (the padding is calibrated on too)."""
        from algorithms.rl_inputs import PromptLoader
        from core.data.alignment import preference_batch

        cfg = self.cfg
        indices = list(range(len(self.examples)))
        first = [i for i, _ in PromptLoader(indices, samples, cfg.train.seed, cfg.data.shuffle).next_batch()]
        size, pad = cfg.train.micro_batch_size, self.tokenizer.pad_token_id or 0
        return [
            {
                k: v.to(self.device)
                for k, v in preference_batch([self.examples[i] for i in first[j : j + size]], pad).items()
            }
            for j in range(0, len(first), size)
        ]

    def eval_chunks(self) -> list[list[int]]:
        n, size = len(self.eval_examples), self.cfg.train.micro_batch_size
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def loop_state(self) -> dict[str, Any]:
        return {**super().loop_state(), "data": self.loader.state_dict()}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        super().load_loop_state(state)
        self.loader.load_state_dict(state["data"])
