"""Post-training quantization with NVIDIA ModelOpt: calibrate, evaluate before/after, export.

    rl quantize configs/quantize_tiny.yaml

What is quantized is the Hugging Face (transformers) model built from model.init_from, not our GPTModel:
ModelOpt's `mtq.quantize` knows transformers' modules (attention, linears) and its unified HF export
(`export_hf_checkpoint`) reads HF module names and configs, which is what serving engines load. Any
stage's output is a source (algorithms/rl_inputs.py resolve_init); one that is not already an HF
directory is written as one first (core.bridge.save_hf) into run.dir/source_hf/.

For each format in quantize.formats, in run.dir/FORMAT/:
    modelopt_state.pth   `mto.save` of the fake-quantized model (quantizer state + weights): `mto.restore`
                         onto a fresh model of the source (restore_fake_quant) evaluates or fine-tunes again
    hf/                  the unified HF checkpoint: packed weights (fp8/int8/int4) + scales, config.json
                         with a quantization_config and hf_quant_config.json, the tokenizer next to them;
                         load_exported reads it back (dequantized weights, the same activation quantizers)
and run.dir/report.md + metrics.jsonl: held-out task accuracy (greedy) and perplexity, weight bytes and
export size, the unquantized model first.

Formats: fp8 (per-tensor weights and activations), int8_sq (SmoothQuant W8A8, per-channel weights),
int4_awq (AWQ-lite, W4A16, blocks of 128 input channels) run and export on the CPU; w4a8_awq and nvfp4
need CUDA and stop at the start on a machine without it. Calibration runs `calibration.num_samples`
documents of any of our data formats (text, prompt/completion, prompt/answer or chat rows; or the
embedded arithmetic task), packed into rows of calibration.seq_len tokens.

Quantization-aware training on our own core (the `quantize:` section of rl sft / dpo / distill) is
algorithms/qat.py; it builds on register_parallel_linears (bottom), and its export is read back by
load_exported like this module's.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from algorithms.model_config import SourceModelConfig
from algorithms.trainer import LoopConfig
from core.config import InputPath, RunConfig, Schema
from core.errors import InputError

SUMMARY = ("accuracy", "perplexity", "export_accuracy", "export_perplexity")
Format = Literal["fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4"]


@dataclass(frozen=True)
class FormatSpec:
    recipe: str  # the mtq config constant
    export_algo: str  # hf_quant_config.json's quant_algo
    cuda_only: bool
    block_size: int | None = None  # input channels per weight scale (every linear's in_features divides it)


FORMATS: dict[str, FormatSpec] = {
    "fp8": FormatSpec("FP8_DEFAULT_CFG", "FP8", False),
    "int8_sq": FormatSpec("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL", False),
    "int4_awq": FormatSpec("INT4_AWQ_CFG", "W4A16_AWQ", False, 128),
    "w4a8_awq": FormatSpec("W4A8_AWQ_BETA_CFG", "W4A8_AWQ", True, 128),
    "nvfp4": FormatSpec("NVFP4_DEFAULT_CFG", "NVFP4", True, 16),
}


class ArithmeticSetConfig(Schema):
    """Problems of the embedded arithmetic task ("12+34=" -> "46")."""

    n: int = Field(200, ge=1, description="problems")
    digits: int = Field(2, ge=1, le=6)
    ops: str = Field("+", pattern=r"^[+\-*]+$")
    seed: int = 7


class CalibrationConfig(Schema):
    path: InputPath | None = Field(
        None,
        description="rows: {text}, {prompt, completion|answer} or chat {messages}; .jsonl, .parquet or a "
        "save_to_disk directory",
    )
    synthetic: ArithmeticSetConfig | None = Field(None, description="the embedded arithmetic task")
    num_samples: int = Field(128, ge=1, description="documents calibrated on (the first ones)")
    seq_len: int = Field(64, ge=2, description="tokens per packed calibration row")
    batch_size: int = Field(16, ge=1, description="rows per calibration forward")

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationConfig:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of calibration.path and calibration.synthetic")
        return self


class QuantizeEvalConfig(Schema):
    path: InputPath | None = Field(
        None, description="held-out rows with an answer: {prompt, answer} (+ text) or chat {messages, answer}"
    )
    synthetic: ArithmeticSetConfig | None = Field(
        None, description="held-out problems of the arithmetic task"
    )
    verifier: Literal["arithmetic", "exact"] = Field(
        "arithmetic", description="arithmetic: the task's verifier; exact: the completion equals the answer"
    )
    num_rows: int = Field(200, ge=1, description="held-out rows evaluated")
    max_new_tokens: int = Field(6, ge=1, description="greedy tokens per answer")

    @model_validator(mode="after")
    def _one_source(self) -> QuantizeEvalConfig:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of eval.path and eval.synthetic")
        return self


class QuantizeSection(Schema):
    formats: list[Format] = Field(min_length=1, description="one export per format, in this order")


class QuantizeConfig(LoopConfig):
    """`train.seed` seeds the run; the other training sections are unused (PTQ takes no optimizer step)."""

    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/quantize"))
    model: SourceModelConfig
    quantize: QuantizeSection
    calibration: CalibrationConfig
    eval: QuantizeEvalConfig = Field(
        default_factory=lambda: QuantizeEvalConfig(synthetic=ArithmeticSetConfig())
    )


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    source: Any  # InitSource
    tokenizer: Any
    tokenizer_dir: Path
    calibration: list[list[int]]  # (rows, <= seq_len) packed token ids
    eval_rows: list[dict[str, Any]]


def check_inputs(cfg: QuantizeConfig) -> Inputs:
    """Every input, before anything is written: the layout (this process, one rank), each format on this
    machine, the model source and tokenizer, the calibration and held-out data. InputError (one line)."""
    from algorithms.alignment_inputs import source_tokenizer
    from algorithms.rl_inputs import init_config

    if cfg.on_ray or cfg.parallel.world_size != 1:
        raise InputError("rl quantize runs in this process on one device: drop placement, ray and parallel.*")
    if len(set(cfg.quantize.formats)) != len(cfg.quantize.formats):
        raise InputError(f"quantize.formats lists a format twice: {cfg.quantize.formats}")
    for name in cfg.quantize.formats:
        if FORMATS[name].cuda_only and not torch.cuda.is_available():
            raise InputError(
                f"quantize.formats: {name} needs a CUDA GPU (ModelOpt cannot calibrate or export it on the "
                "CPU); on this machine use fp8, int8_sq or int4_awq"
            )
    source, tokenizer, tokenizer_dir = source_tokenizer(cfg.model)
    config = init_config(source)
    for name in cfg.quantize.formats:
        check_blocks(name, config, "quantize.formats")
    calibration = calibration_rows(cfg.calibration, tokenizer)
    eval_rows = held_out_rows(cfg.eval)
    if cfg.eval.verifier == "arithmetic":  # every held-out prompt must be a problem the verifier parses
        from algorithms.alignment_inputs import eval_prompt
        from core.data.synthetic import score_arithmetic

        for row in eval_rows:
            score_arithmetic(eval_prompt(tokenizer, row)[1], "")
    return Inputs(source, tokenizer, Path(tokenizer_dir), calibration, eval_rows)


def check_blocks(name: str, config: Any, where: str) -> None:
    """InputError unless the format's weight blocks divide every linear's input width (`where`: the key)."""
    block = FORMATS[name].block_size
    if block is None:
        return
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    widths = {
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_attention_heads * head_dim": config.num_attention_heads * head_dim,
    }
    for key, width in widths.items():
        if width and width % block:
            raise InputError(
                f"{where}: {name} quantizes weights in blocks of {block} input channels, and the "
                f"model's {key}={width} is not a multiple of {block}"
            )


def _documents(rows: list[dict[str, Any]], tokenizer: Any, where: str) -> list[list[int]]:
    """Token ids of whole documents: text, prompt + completion/answer (BOS ... EOS), or a rendered chat."""
    from algorithms.evaluation import encode_prompt
    from core.data.alignment import _render_ids

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    docs = []
    for i, row in enumerate(rows):
        if "messages" in row:
            docs.append(_render_ids(tokenizer, row["messages"], f"{where} row {i + 1}"))
            continue
        if isinstance(row.get("text"), str):
            text = row["text"]
        elif isinstance(row.get("prompt"), str):
            text = row["prompt"] + str(row.get("completion", row.get("answer", "")))
        else:
            raise InputError(f"{where} row {i + 1}: no text, prompt or messages")
        docs.append(encode_prompt(tokenizer, text) + eos)
    return docs


def _rows_of(path: Any) -> list[dict[str, Any]]:
    from core.data.alignment import read_rows

    return [record for record, _ in read_rows(path)] if path is not None else []


def _arithmetic_rows(syn: ArithmeticSetConfig, held_out: bool) -> list[dict[str, Any]]:
    from core.data.synthetic import generate_arithmetic

    train, test = generate_arithmetic(
        0 if held_out else syn.n, syn.n if held_out else 0, syn.seed, syn.digits, syn.ops
    )
    return [{"text": p.text, "prompt": p.prompt, "answer": p.answer} for p in (test if held_out else train)]


def calibration_rows(calib: CalibrationConfig, tokenizer: Any) -> list[list[int]]:
    """The first num_samples documents, concatenated and cut into rows of seq_len tokens (no padding, so
    every calibrated activation is a real token's)."""
    rows = _rows_of(calib.path) if calib.path else _arithmetic_rows(calib.synthetic, False)
    docs = _documents(rows[: calib.num_samples], tokenizer, str(calib.path or "calibration.synthetic"))
    stream = [t for doc in docs for t in doc]
    packed = [stream[i : i + calib.seq_len] for i in range(0, len(stream), calib.seq_len)]
    if not stream:
        raise InputError(
            f"calibration: {calib.path or 'calibration.synthetic'} has no tokens to calibrate on"
        )
    return packed


def held_out_rows(ev: QuantizeEvalConfig) -> list[dict[str, Any]]:
    rows = _rows_of(ev.path) if ev.path else _arithmetic_rows(ev.synthetic, True)
    rows = [r for r in rows if "answer" in r and ("prompt" in r or "messages" in r)][: ev.num_rows]
    if not rows:
        raise InputError(f"eval.path: {ev.path} has no rows with an answer and a prompt or messages")
    return rows


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def perplexity(model: torch.nn.Module, docs: list[list[int]]) -> float:
    """exp(mean next-token NLL) over every predicted token of the documents (one forward each)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in docs:
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()  # (T-1, V)
        total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return float(torch.tensor(total / count).exp())


@torch.no_grad()
def greedy_completions(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int, eos: int | None):
    """Greedy token ids per prompt (EOS and what follows dropped): prompts of one length go in one batch,
    so no padding changes the numbers; no KV cache (the models here are tiny)."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
        x = torch.tensor([prompts[i] for i in idx], device=device)  # (B, T)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_tokens):
            nxt = model(input_ids=x, use_cache=False).logits[:, -1].argmax(-1)  # (B,)
            for j, i in enumerate(idx):
                if not done[j] and (eos is None or nxt[j].item() != eos):
                    out[i].append(int(nxt[j]))
            if eos is not None:
                done |= nxt == eos
            x = torch.cat([x, nxt[:, None]], dim=1)
    return out


def evaluate(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]], ev: QuantizeEvalConfig):
    """{"accuracy": greedy answers right, "perplexity": on the rows' full texts}."""
    from algorithms.alignment_inputs import eval_prompt
    from core.data.synthetic import score_arithmetic

    model.eval()
    prompts, texts = zip(*(eval_prompt(tokenizer, r) for r in rows), strict=True)
    completions = greedy_completions(model, list(prompts), ev.max_new_tokens, tokenizer.eos_token_id)
    decoded = tokenizer.batch_decode(completions, skip_special_tokens=True)
    correct = [
        score_arithmetic(t, d) if ev.verifier == "arithmetic" else d.strip() == str(r["answer"]).strip()
        for r, t, d in zip(rows, texts, decoded, strict=True)
    ]
    return {
        "accuracy": sum(correct) / len(rows),
        "perplexity": perplexity(model, _documents(rows, tokenizer, "eval")),
    }


# ---------------------------------------------------------------------------------------------- models


def run_device() -> str:
    """Where models are quantized and evaluated: the GPU when there is one (w4a8_awq, nvfp4 need it)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_hf_model(path: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(run_device())


def source_hf_dir(source: Any, tokenizer_dir: Path, run_dir: Path) -> Path:
    """The source as an HF directory: itself when it is one, else written to run_dir/source_hf."""
    if source.kind == "hf":
        return source.path
    from algorithms.rl_inputs import load_init
    from algorithms.trainer import publish_dir
    from core.bridge import save_hf

    model, arch = load_init(source)
    return publish_dir(run_dir / "source_hf", lambda tmp: save_hf(model, tmp, tokenizer_dir, arch))


def quantize_model(model: torch.nn.Module, name: str, calibration: list[list[int]], batch_size: int):
    """Inserts the format's quantizers and calibrates them on the packed rows (in place; returns model)."""
    import copy

    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device

    def forward_loop(m: torch.nn.Module) -> None:
        # Rows of one length per batch (the last row may be shorter): no padding enters the statistics.
        for start in range(0, len(calibration), batch_size):
            chunk = calibration[start : start + batch_size]
            for length in sorted({len(r) for r in chunk}):
                m(
                    input_ids=torch.tensor([r for r in chunk if len(r) == length], device=device),
                    use_cache=False,
                )

    recipe = copy.deepcopy(getattr(mtq, FORMATS[name].recipe))
    with torch.no_grad():
        return mtq.quantize(model, recipe, forward_loop)


def restore_fake_quant(base_hf: str | Path, state_path: str | Path) -> torch.nn.Module:
    """The fake-quantized model again: `mto.restore` of a modelopt_state.pth onto a fresh source model."""
    import modelopt.torch.opt as mto

    return mto.restore(load_hf_model(base_hf), str(state_path))


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out/2, in) uint8, two signed nibbles of consecutive output rows per byte (ModelOpt's
    pack_int4_in_uint8) -> (out, in) int8 in [-8, 7]."""
    low, high = (packed & 0x0F).to(torch.int8), (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=1).reshape(-1, packed.shape[1])  # rows 2k, 2k+1 from byte row k
    return torch.where(both >= 8, both - 16, both)


# FP4 (E2M1) values of the 16 nibbles: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8, two E2M1 nibbles of consecutive input channels per byte (low nibble first:
    ModelOpt's NVFP4QTensor) -> (out, in) fp32."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return torch.tensor(E2M1, device=packed.device)[nibbles.long()]


def _dequantize(
    weight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor | None = None
) -> torch.Tensor:
    """The fp32 weight of an exported one. int4 (int4_awq, w4a8_awq): nibble * its block's scale;
    nvfp4: E2M1 value * its 16-block's fp8 scale * the tensor's weight_scale_2; fp8 / int8: value *
    per-tensor or per-channel scale."""
    if weight.dtype == torch.uint8 and scale_2 is not None and scale.dtype == torch.float8_e4m3fn:
        q = _unpack_fp4(weight)  # nvfp4: scale (out, in / 16) in fp8, scale_2 ()
        block_scale = scale.float() * scale_2.float()
        return q * block_scale.repeat_interleave(q.shape[1] // scale.shape[1], dim=1)
    if weight.dtype == torch.uint8:  # int4, one scale per block of input channels: scale (out, in/block)
        q = _unpack_int4(weight).float()
        return q * scale.float().repeat_interleave(q.shape[1] // scale.shape[1], dim=1)
    scale = scale.float()
    return weight.float() * (scale[:, None] if scale.dim() == 1 else scale)


def load_exported(path: str | Path) -> torch.nn.Module:
    """A unified HF checkpoint read back into transformers with its quantization: the weights dequantized
    from their packed values and scales, and the format's quantizers inserted with the exported scales
    (weight_scale -> weight amax, input_scale -> activation amax, pre_quant_scale -> the smoothing the input
    gets). The dequantized weights sit on the quantization grid, so re-quantizing them with the exported
    scales gives them back. (A max calibration on them would find the scales again only where a weight
    sits at the grid's end: after PTQ always, after QAT not always, since the weights train under fixed
    scales.) Evaluates like the fake-quantized model the export was made from."""
    import copy

    import modelopt.torch.quantization as mtq
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    algo = json.loads((path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    name = next((n for n, spec in FORMATS.items() if spec.export_algo == algo), None)
    if name is None:
        raise InputError(f"{path}: quant_algo {algo} is not one rl quantize writes")
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(run_device())
    extras = (".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale")
    plain = {k: v for k, v in tensors.items() if not k.endswith(extras)}
    for key in plain:
        module_name = key.removesuffix(".weight")
        scale = tensors.get(module_name + ".weight_scale")
        if key.endswith(".weight") and scale is not None:
            plain[key] = _dequantize(plain[key], scale, tensors.get(module_name + ".weight_scale_2"))
    missing, unexpected = model.load_state_dict(
        {k: v.to(run_device()) for k, v in plain.items()}, strict=False
    )
    if [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings] or unexpected:
        raise InputError(f"{path}: checkpoint does not match its config: {(missing + unexpected)[:3]}")
    recipe = copy.deepcopy(getattr(mtq, FORMATS[name].recipe))
    recipe["algorithm"] = "max"
    with torch.no_grad():
        model = mtq.quantize(model, recipe, None)  # None: weight-only calibration (the dequantized weights)
    from modelopt.torch.quantization.nn import SequentialQuantizer

    # nvfp4 exports per-tensor scales amax / (6 * 448) (E2M1's and E4M3's largest values); its 16-blocks'
    # scales are recomputed from the weights by the (dynamic) block quantizer, so they set nothing here
    global_bound = 6.0 * 448.0 if name == "nvfp4" else None
    modules = dict(model.named_modules())
    for key, value in tensors.items():
        module_name, _, kind = key.rpartition(".")
        value = value.float().to(run_device())
        if kind in ("weight_scale", "weight_scale_2"):
            quantizer = modules[module_name].weight_quantizer
            if isinstance(quantizer, SequentialQuantizer):  # w4a8_awq: int4 blocks, then fp8 per tensor
                quantizer = quantizer[0] if kind == "weight_scale" else quantizer[1]
            elif global_bound is not None:
                if kind == "weight_scale_2":
                    quantizer.amax = (value * global_bound).reshape(quantizer.amax.shape)
                continue
            # (), (out,) or (out, in / block) -> the quantizer's amax layout
            quantizer.amax = (value * quantizer.maxbound).reshape(quantizer.amax.shape)
        elif kind == "input_scale":
            quantizer = modules[module_name].input_quantizer
            quantizer.amax = (value * (global_bound or quantizer.maxbound)).reshape(())
        elif kind == "pre_quant_scale":
            modules[module_name].input_quantizer.pre_quant_scale = value
    return model


# ---------------------------------------------------------------------------------------------- run


def _bytes(path: Path) -> dict[str, int]:
    """{"weight_bytes": bytes of every tensor in the safetensors files, "export_bytes": every file}."""
    from safetensors import safe_open

    weight = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_slice(key)
                weight += math.prod(t.get_shape()) * _itemsize(t.get_dtype())
    return {
        "weight_bytes": weight,
        "export_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
    }


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2}.get(dtype, 1)


def quantize_one(name: str, base_hf: Path, inputs: Inputs, cfg: QuantizeConfig, run_dir: Path) -> dict:
    """Calibrate, evaluate, save the modelopt state, then export (the export packs the weights in place,
    so it comes last)."""
    import modelopt.torch.opt as mto
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    from algorithms.trainer import publish_dir
    from core.bridge.hf import copy_tokenizer_files

    start = time.perf_counter()
    model = quantize_model(load_hf_model(base_hf), name, inputs.calibration, cfg.calibration.batch_size)
    with torch.no_grad():
        # What the export does first, done now so that the model evaluated and saved is the one exported:
        # linears that read one input (q/k/v, gate/up) get one smoothing scale (the mean of theirs, their
        # weights rescaled and re-calibrated) folded into the norm before them. Without it AWQ's exported
        # checkpoint is another model than the calibrated one (0.03-0.06 accuracy apart on the tiny task).
        requantize_resmooth_fused_llm_layers(model)
    calibrate_s = time.perf_counter() - start
    row = evaluate(model, inputs.tokenizer, inputs.eval_rows, cfg.eval)
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    mto.save(model, str(out / "modelopt_state.pth"))

    def write(tmp: Path) -> None:
        with torch.no_grad():
            export_hf_checkpoint(model, export_dir=tmp)
        copy_tokenizer_files(inputs.tokenizer_dir, tmp)

    publish_dir(out / "hf", write)
    exported = evaluate(load_exported(out / "hf"), inputs.tokenizer, inputs.eval_rows, cfg.eval)
    return {
        **row,
        **{f"export_{k}": v for k, v in exported.items()},
        **_bytes(out / "hf"),
        "calibrate_s": calibrate_s,
    }


def write_report(run_dir: Path, rows: dict[str, dict[str, float]], cfg: QuantizeConfig) -> str:
    """report.md: one line per model, the unquantized source first."""
    base = rows["none"]
    lines = [
        f"# rl quantize: {cfg.model.init_from}",
        "",
        f"Held-out: {cfg.eval.path or 'arithmetic (synthetic)'}, {cfg.eval.num_rows} rows max; "
        f"calibration: {cfg.calibration.num_samples} documents of {cfg.calibration.path or 'arithmetic'}.",
        "",
        "accuracy/perplexity: the fake-quantized model in memory (= `mto.restore` of modelopt_state.pth); "
        "exported: FORMAT/hf/ read back (load_exported). Before evaluation the linears that read one input "
        "(q/k/v, gate/up) share one smoothing scale folded into the norm before them, as the export needs; "
        "the export then folds the scales in fp32 (perplexity within ~1e-4).",
        "",
        "| format | accuracy | perplexity | exported accuracy | exported perplexity | weight bytes | export size "
        "| vs. source | calibrate s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = r["weight_bytes"] / base["weight_bytes"]
        calib = f"{r['calibrate_s']:.1f}" if "calibrate_s" in r else "-"
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {r['perplexity']:.4f} | {r['export_accuracy']:.3f} | "
            f"{r['export_perplexity']:.4f} | {int(r['weight_bytes']):,} | "
            f"{int(r['export_bytes']):,} | {ratio:.2f}x | {calib} |"
        )
    text = "\n".join(lines) + "\n"
    (run_dir / "report.md").write_text(text)
    return text


def run_quantize(cfg: QuantizeConfig, resume: str) -> dict[str, float]:
    """`rl quantize`: check every input, then the source row and one row per format (module docstring)."""
    import yaml

    inputs = check_inputs(cfg)
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    base_hf = source_hf_dir(inputs.source, inputs.tokenizer_dir, run_dir)
    source = evaluate(load_hf_model(base_hf), inputs.tokenizer, inputs.eval_rows, cfg.eval)
    rows = {"none": {**source, **{f"export_{k}": v for k, v in source.items()}, **_bytes(base_hf)}}
    for name in cfg.quantize.formats:
        rows[name] = quantize_one(name, base_hf, inputs, cfg, run_dir)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for name, r in rows.items():
            f.write(json.dumps({"format": name, **r}) + "\n")
    print(write_report(run_dir, rows, cfg), end="")
    return {
        f"quantize/{name}/{k}": float(v) for name, r in rows.items() for k, v in r.items() if k in SUMMARY
    }


# ---------------------------------------------------------------------------------------------- QAT


def register_parallel_linears() -> None:
    """Lets `mtq.quantize` quantize our GPTModel's ColumnParallelLinear / RowParallelLinear (the building
    block of QAT on our own core). They are not nn.Linear subclasses, so ModelOpt's registry does not know
    them; like its fairscale/Megatron plugins, the quantized class swaps `F.linear` during forward for one
    that quantizes the input and the weight (our layers look `F.linear` up at call time, so the swap
    reaches them; fp8 mode calls core.tensor_parallel.fp8 instead and is not quantized). The quantizers
    see the rank's weight shard; the tp group is the layer's own (a per-tensor amax is synced over it), and
    no data-parallel group is given: each dp rank would calibrate on its own rows. Idempotent."""
    import torch.nn.functional as F
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.plugins.custom import _ParallelLinear
    from modelopt.torch.utils.distributed import ParallelState

    from core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if QuantModuleRegistry.get(ColumnParallelLinear) is not None:
        return

    class _QuantTandemParallelLinear(_ParallelLinear):
        _functionals_to_replace = [(F, "linear")]

        def _setup(self) -> None:
            tp = self.tp_group if self.tp_group is not None else -1
            self.parallel_state = ParallelState(data_parallel_group=-1, tensor_parallel_group=tp)
            super()._setup()

    class _QuantColumnParallelLinear(_QuantTandemParallelLinear):
        _is_column_parallel = True

    class _QuantRowParallelLinear(_QuantTandemParallelLinear):
        _is_row_parallel = True

    QuantModuleRegistry.register({ColumnParallelLinear: "tandem_ColumnParallelLinear"})(
        _QuantColumnParallelLinear
    )
    QuantModuleRegistry.register({RowParallelLinear: "tandem_RowParallelLinear"})(_QuantRowParallelLinear)
