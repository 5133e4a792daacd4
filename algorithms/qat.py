"""Quantization-aware training (QAT) with NVIDIA ModelOpt on our own GPTModel, for the EngineTrainer loops.

A `quantize:` section in the config of rl sft, rl dpo or rl distill (the student) trains the fake-quantized
model:

    quantize:
      format: int4_awq            # algorithms/quantize.py FORMATS; w4a8_awq and nvfp4 need CUDA
      calibration_samples: 64     # training rows (packed rows; pairs for dpo) the scales are calibrated on

build   Once the engine's chunks hold the initial weights (and before a checkpoint is resumed), ModelOpt's
        quantizers go into every column/row-parallel linear (quantize.register_parallel_linears, then
        mtq.quantize with the format's recipe: max, SmoothQuant or AWQ-lite calibration), calibrated on
        the first calibration_samples rows of the loop's own training order. Every dp rank calibrates on
        the same rows, so every replica holds the same scales. Quantizers add buffers, no parameters: the
        gradient buffers and the optimizer are the same as without them. The output layer stays
        unquantized (the recipes say so).
train   Each forward fake-quantizes the weights (and for fp8 / int8_sq the activations) with the
        calibrated amax, which stay fixed; backward is ModelOpt's straight-through estimator (gradient 1
        inside [-amax, amax], 0 where a value is clipped).
smoothing  int8_sq and int4_awq scale a linear's input by s (input_quantizer.pre_quant_scale) and its
        weight by 1/s. That 1/s stays in the weight quantizer (weight_quantizer.pre_quant_scale: ModelOpt's
        switch for auto_quantize) instead of being folded into the weight, so the trained parameters
        stay the plain model's weights: checkpoints, hf/ and a next stage's init_from read them as any
        run's, and only the quantized export below applies the scales.
checkpoints  checkpoints/step_N/quantizers/ (DCP, next to model/): every quantizer buffer (amax,
        pre_quant_scale) by module name. A resume calibrates again and then loads them, so it continues
        with exactly the scales the run trained with.
export  hf/ as every loop writes it (the trained weights, unquantized), and quantized/:
          hf/                 ModelOpt's unified HF checkpoint of the QAT'd model (packed weights + scales,
                              hf_quant_config.json, the tokenizer); algorithms.quantize.load_exported reads it
          modelopt_state.pth  `mto.save` of that fake-quantized HF model: quantize.restore_fake_quant(
                              run.dir/hf, it) evaluates or fine-tunes it again
        Route (export_quantized): the trained weights become transformers modules (core.bridge), get the
        format's quantizers (mtq.quantize, weight-only max calibration), and then the trained quantizer
        state is copied onto them through the name mapping: a per-tensor amax goes to every HF linear of a
        fused one (q/k/v_proj of linear_qkv, gate/up_proj of linear_fc1), a per-channel or per-block amax
        is split along the output rows like the weight, and an input amax is shared. The weight's 1/s is
        multiplied into the exported weight (the product the weight quantizer forms), and the input's s of
        linear_qkv / linear_fc1 into the norm before it (what ModelOpt's export does for AWQ; here for
        int8_sq too, so its per-group re-smoothing, which would re-calibrate the QAT'd scales, finds
        nothing to average); o_proj and down_proj keep theirs as pre_quant_scale.
        Read back with load_exported, the export evaluates like the QAT'd model in memory up to fp32
        rounding (the fold's different product order and transformers' forward against ours; tests/test_qat.py).

RL (rl grpo, rl ppo: the policy; quantize_policy, in-process or in each Ray policy worker)  The
        quantizers go into the policy's engine,
        calibrated on the first calibration_samples training prompts (one row per forward: no padding in
        the activation statistics). The reference and the critic stay unquantized: the KL term pulls the
        quantized policy towards the full-precision model it started from. The native engine generates
        from the policy's own modules, quantizers included, so sampler and trainer logprobs agree as
        without QAT. An engine fed by refit (vLLM) gets each weight as the trained forward uses it
        (fake_quantized_weights: the weight quantizer's output times the input's smoothing scale): exact
        for the weight-only formats (int4_awq); fp8 / int8_sq / w4a8_awq also quantize activations, which
        such an engine does not, and the step's rollout/logprob_gap shows by how much. The policy's
        checkpoint holds the quantizer buffers (algorithms/engine_model.py), and the export writes
        quantized/ as above from hf/.

Layouts: data parallelism only (tp = pp = cp = ep = 1). tp would shard the per-channel scales, the
smoothing statistics and the int4 blocks of row-parallel inputs; pp would calibrate and export stage by
stage: neither is written, and both are refused at the start, as are LoRA, train.compile and precision.fp8
(whose matmuls bypass F.linear, so its layers would not be quantized).
"""

from __future__ import annotations

import copy
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from algorithms.quantize import FORMATS, Format
from core.config import Schema
from core.errors import InputError

# The norm whose output is a fused linear's whole input: the input's smoothing scale is folded into it.
NORM_BEFORE = {"self_attention.linear_qkv": "input_norm", "mlp.linear_fc1": "pre_mlp_norm"}


class QATConfig(Schema):
    """Quantization-aware training: the model trains through ModelOpt's fake quantizers (algorithms/qat.py)."""

    format: Format = Field(description="fp8, int8_sq, int4_awq (CPU or CUDA); w4a8_awq, nvfp4 (CUDA only)")
    calibration_samples: int = Field(
        64, ge=1, description="training rows (packed rows; pairs for dpo) the quantizer scales come from"
    )


def check_qat(cfg: Any) -> None:
    """InputError (one line) when the config's `quantize:` cannot run here: a CUDA-only format without
    CUDA, a layout other than dp, LoRA, train.compile or precision.fp8. Nothing to check without one (rl
    quantize's own `quantize:` section, a list of PTQ formats, is not one)."""
    qat = getattr(cfg, "quantize", None)
    if not isinstance(qat, QATConfig):
        return
    name = qat.format
    if FORMATS[name].cuda_only and (not torch.cuda.is_available() or cfg.train.device == "cpu"):
        raise InputError(
            f"quantize.format: {name} needs a CUDA GPU (ModelOpt cannot calibrate or export it on the CPU); "
            "on this machine use fp8, int8_sq or int4_awq"
        )
    sharded = {f"parallel.{k}": getattr(cfg.parallel, k) for k in ("tp", "pp", "cp", "ep")}
    sharded = {k: v for k, v in sharded.items() if v > 1}
    if sharded:
        raise InputError(
            f"quantize: QAT runs with data parallelism only, not {sharded}: sharded quantizer scales and "
            "their export are not written yet (use parallel.dp)"
        )
    if getattr(cfg, "lora", None) is not None:
        raise InputError("quantize: QAT trains every weight through its quantizers; drop lora")
    if cfg.train.compile:
        raise InputError(
            "quantize: compiled layers are not validated with ModelOpt's quantizers; set train.compile=false"
        )
    if getattr(cfg.precision, "fp8", "off") != "off":
        raise InputError(
            "quantize: precision.fp8 computes the linears outside F.linear, so they would not be quantized"
        )


# ---------------------------------------------------------------------------------------------- build


@contextmanager
def smoothing_kept_out_of_weights() -> Iterator[None]:
    """Inside, SmoothQuant / AWQ calibration puts a linear's 1/s into its weight quantizer instead of
    multiplying it into the weight (ModelOpt's auto_quantize switch), so the weights stay the plain model's."""
    from modelopt.torch.quantization import model_calib

    before = model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS
    model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS = False
    try:
        yield
    finally:
        model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS = before


def _no_output(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
    return logits.new_zeros(()), {}


def insert_quantizers(engine: Any, name: str, micro_batches: list[dict[str, torch.Tensor]]) -> None:
    """The format's quantizers in every column/row-parallel linear of the engine's chunks (in place),
    calibrated by forwards of the micro-batches through the engine (its pipeline schedule, forward only)."""
    import modelopt.torch.quantization as mtq

    from algorithms.quantize import register_parallel_linears

    register_parallel_linears()
    recipe = copy.deepcopy(getattr(mtq, FORMATS[name].recipe))
    with smoothing_kept_out_of_weights(), torch.no_grad():
        # A list of the chunks is the "model": ModelOpt converts each linear in place, and the forward
        # loop runs the engine (AWQ-lite runs it twice: statistics, then the scale search).
        mtq.quantize(
            torch.nn.ModuleList(engine.chunks),
            recipe,
            lambda _: engine.forward_collect(micro_batches, _no_output),
        )
    split_state(quantizer_state(engine.chunks))  # what the export will copy: known now, not after training


def quantize_policy(policy: Any, name: str, prompts: Sequence[Sequence[int]]) -> None:
    """RL QAT: the format's quantizers into a PolicyModel's engine (in place), calibrated by forwards of
    the prompts' token ids, one row each."""
    from algorithms.quantize import check_blocks

    check_blocks(name, policy.config, "quantize.format")
    device = policy.device
    rows = [{"input_ids": torch.tensor([list(p)], dtype=torch.long, device=device)} for p in prompts]
    insert_quantizers(policy.engine, name, rows)


def modelopt_loaded() -> bool:
    """Quantizers exist only once ModelOpt is imported: the checks below skip that import otherwise."""
    return "modelopt.torch.quantization" in sys.modules


@contextmanager
def fake_quantized_weights(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Inside, every quantized linear's weight holds what its forward multiplies the (unquantized)
    input by: weight_quantizer(W) (the 1/s smoothing and the fake quantization) times the input's
    smoothing scale s per input column. Stream refit weights inside (rollout.refit); W is restored
    exactly on exit. A no-op for chunks without quantizers. Activation quantization has no weight form:
    an engine fed these weights computes with unquantized activations."""
    if not modelopt_loaded():
        yield
        return
    from modelopt.torch.quantization.nn import QuantModule

    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for chunk in chunks:
                for module in chunk.modules():
                    if not isinstance(module, QuantModule) or not hasattr(module, "weight_quantizer"):
                        continue
                    weight = module.weight
                    effective = module.weight_quantizer(weight)  # (out, in)
                    scale = getattr(module.input_quantizer, "pre_quant_scale", None)
                    if scale is not None:
                        effective = effective * scale.reshape(1, -1).to(effective.dtype)
                    saved.append((weight, weight.data))
                    weight.data = effective.to(weight.dtype)
        yield
    finally:
        for weight, data in saved:
            weight.data = data


def quantizer_state(chunks: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{"<module>.<weight|input>_quantizer.<buffer>": tensor}: every quantizer buffer (_amax,
    _pre_quant_scale) of the chunks under global module names, the buffers themselves (a DCP load writes
    into them)."""
    if not modelopt_loaded():
        return {}
    from modelopt.torch.quantization.nn import TensorQuantizer

    state = {}
    for chunk in chunks:
        for module_name, module in chunk.named_modules():
            if isinstance(module, TensorQuantizer):
                for buffer_name, buffer in module.named_buffers(recurse=False):
                    state[f"{module_name}.{buffer_name}"] = buffer
    return state


# ---------------------------------------------------------------------------------------------- export


# "<module>.<quantizer>.<buffer>"; a quantizer path may hold an index (w4a8_awq's two weight quantizers)
QUANTIZER_KEY = re.compile(r"(.+)\.((?:weight|input|output)_quantizer(?:\.\d+)?)\.(_amax|_pre_quant_scale)")


def split_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"layers.0.mlp.linear_fc1": {"weight_quantizer._amax": t, "input_quantizer._pre_quant_scale": t}}
    (fp32, CPU); InputError for a buffer the export does not know (checked at build, before training)."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = QUANTIZER_KEY.fullmatch(key)
        if match is None:
            raise InputError(f"quantize: the export does not know the quantizer buffer {key}")
        module, quantizer, buffer = match.groups()
        by_module.setdefault(module, {})[f"{quantizer}.{buffer}"] = tensor.detach().float().cpu()
    return by_module


def export_form(model: Any, state: dict[str, torch.Tensor]) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """(a copy of the plain trained GPTModel with the smoothing applied: each weight times its weight
    quantizer's 1/s, the s of linear_qkv / linear_fc1 folded into the norm before it; the quantizer buffers
    left for the HF modules, by our module name)."""
    model = copy.deepcopy(model)
    by_module = split_state(state)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module_name, buffers in by_module.items():
            weight_scale = buffers.pop("weight_quantizer._pre_quant_scale", None)  # (1, in)
            if weight_scale is not None:
                weight = modules[module_name].weight
                weight.copy_(weight * weight_scale.to(weight.dtype))  # the product the quantizer forms
            fused = next((f for f in NORM_BEFORE if module_name.endswith(f".{f}")), None)
            norm = modules[module_name.removesuffix(fused) + NORM_BEFORE[fused]] if fused else None
            input_scale = buffers.get("input_quantizer._pre_quant_scale")
            if norm is not None and input_scale is not None:
                for p in (norm.weight, getattr(norm, "bias", None)):
                    if p is not None:
                        p.copy_(p * input_scale.to(p.dtype))
                del buffers["input_quantizer._pre_quant_scale"]
    return model, by_module


def copy_quantizer_state(
    hf_model: Any, by_module: dict[str, dict[str, torch.Tensor]], config: Any, arch: Any
) -> None:
    """Our quantizer buffers onto the HF linears they map to (core.bridge's names): per-tensor and input
    values to each, per-channel / per-block weight amax split along the output rows like the weight."""
    from core.bridge.convert import NameMap, resolve_architecture

    names = NameMap(config, resolve_architecture(arch, config))
    hf_modules = dict(hf_model.named_modules())
    for module_name, buffers in by_module.items():
        param_map, hf_names = names.lookup(f"{module_name}.weight")
        targets = [hf_modules[h.removesuffix(".weight")] for h in hf_names]
        for key, value in buffers.items():
            quantizer_path, _, buffer = key.rpartition(".")
            if buffer == "_amax" and quantizer_path.startswith("weight_quantizer") and value.numel() > 1:
                rows = sum(t.weight.shape[0] for t in targets)
                parts = param_map.to_hf(value.reshape(rows, -1))  # (out, 1) or (out, in / block), by row
            else:
                parts = [value] * len(targets)
            for target, part in zip(targets, parts, strict=True):
                quantizer = target.get_submodule(quantizer_path)
                device = next(target.parameters()).device
                if buffer == "_amax":
                    shape = quantizer.amax.shape if quantizer.amax is not None else part.shape
                    quantizer.amax = part.reshape(shape).to(device)
                else:
                    quantizer.pre_quant_scale = part.to(device)


def export_quantized(
    model: Any, state: dict[str, torch.Tensor], name: str, arch: Any, tokenizer_dir: Any, out: Path
) -> None:
    """out/hf (the unified HF checkpoint) and out/modelopt_state.pth of the QAT'd model: `model` is the
    whole trained GPTModel (plain weights, fp32), `state` its quantizer buffers (module docstring: export)."""
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.quantization.nn import QuantModule
    from modelopt.torch.utils.distributed import ParallelState

    from algorithms.quantize import load_hf_model
    from core.bridge import save_hf
    from core.bridge.hf import copy_tokenizer_files

    smoothed, by_module = export_form(model, state)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(smoothed, tmp, arch=arch)
        hf_model = load_hf_model(tmp)
    recipe = copy.deepcopy(getattr(mtq, FORMATS[name].recipe))
    recipe["algorithm"] = None  # the quantizers only
    with torch.no_grad():
        hf_model = mtq.quantize(hf_model, recipe, None)
        for module in hf_model.modules():  # rank 0 alone: no amax sync over the world's default group
            if isinstance(module, QuantModule):
                module.parallel_state = ParallelState(data_parallel_group=-1)
        mtq.calibrate(hf_model, "max", None)  # weight-only: gives every amax its shape, then overwritten
        copy_quantizer_state(hf_model, by_module, model.config, arch)
    out.mkdir(parents=True, exist_ok=True)
    mto.save(hf_model, str(out / "modelopt_state.pth"))
    with torch.no_grad():  # packs the weights in place: last
        export_hf_checkpoint(hf_model, export_dir=out / "hf")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out / "hf")
