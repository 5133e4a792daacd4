"""`rl quantize`: ModelOpt PTQ of a tiny trained model on the CPU, its two saved forms read back, and the
inputs it refuses before writing anything."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/quantize_tiny.yaml")
CPU_FORMATS = ["fp8", "int8_sq", "int4_awq"]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A random tiny Llama (hidden 64) with the char tokenizer: enough for the input checks."""
    from tiny_llama import save_random_tiny_llama

    from core.data.synthetic import save_char_tokenizer

    root = tmp_path_factory.mktemp("quantize_inputs")
    return save_random_tiny_llama(root / "hf", tokenizer_dir=save_char_tokenizer(root / "tokenizer"))


def refused(capsys, argv: list[str], run_dir: Path) -> str:
    """Runs `rl quantize`; asserts exit 2 with one line and nothing written; returns the line."""
    assert main(["quantize", CONFIG, f"run.dir={run_dir}", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not run_dir.exists()
    return err[0]


SYNTHETIC = ["calibration.path=null", "calibration.synthetic.n=32", "eval.path=null", "eval.synthetic.n=8"]


def test_an_unknown_format_stops_before_writing(random_model, tmp_path, capsys):
    line = refused(
        capsys, [f"model.init_from={random_model}", "quantize.formats=[int3]", *SYNTHETIC], tmp_path / "r"
    )
    assert "int3" in line and "fp8" in line  # the choices are named


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA-only formats run on a GPU")
@pytest.mark.parametrize("fmt", ["nvfp4", "w4a8_awq"])
def test_a_cuda_only_format_on_the_cpu_stops_before_writing(random_model, tmp_path, capsys, fmt):
    line = refused(
        capsys,
        [f"model.init_from={random_model}", f"quantize.formats=[fp8,{fmt}]", *SYNTHETIC],
        tmp_path / "r",
    )
    assert f"{fmt} needs a CUDA GPU" in line


def test_int4_blocks_that_do_not_divide_the_model_stop_before_writing(random_model, tmp_path, capsys):
    line = refused(
        capsys, [f"model.init_from={random_model}", "quantize.formats=[int4_awq]", *SYNTHETIC], tmp_path / "r"
    )
    assert "blocks of 128" in line and "hidden_size=64" in line


def test_missing_or_empty_calibration_data_stops_before_writing(random_model, tmp_path, capsys):
    common = [f"model.init_from={random_model}", "eval.path=null", "eval.synthetic.n=8"]
    line = refused(capsys, [*common, f"calibration.path={tmp_path / 'none.jsonl'}"], tmp_path / "r")
    assert "none.jsonl" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = refused(capsys, [*common, f"calibration.path={empty}"], tmp_path / "r")
    assert "empty.jsonl" in line


# ---- the whole run on a trained model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tiny_pretrain_400) -> Path:
    """The tiny pretrain, shortened: it answers a good share of the held-out sums."""
    return tiny_pretrain_400


@pytest.fixture(scope="module")
def quantized(pretrained, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("quantize") / "ptq"
    argv = [f"run.dir={run_dir}", f"model.init_from={pretrained / 'checkpoints/step_400'}"]
    argv += [f"calibration.path={pretrained / 'data/train.jsonl'}", "calibration.num_samples=64"]
    argv += [f"eval.path={pretrained / 'data/eval.jsonl'}", "eval.num_rows=48"]
    assert main(["quantize", CONFIG, *argv, f"quantize.formats=[{','.join(CPU_FORMATS)}]"]) == 0
    return run_dir


def rows_of(run_dir: Path) -> dict[str, dict]:
    return {r["format"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_report_has_the_before_after_table(quantized):
    rows = rows_of(quantized)
    assert list(rows) == ["none", *CPU_FORMATS]
    assert rows["none"]["accuracy"] > 0.2  # a trained model, so accuracy can show a change
    for name in CPU_FORMATS:
        r = rows[name]
        # Tolerance: on this model 8-bit formats move held-out accuracy by a few problems, 4-bit by more.
        assert abs(r["accuracy"] - rows["none"]["accuracy"]) < (0.15 if name == "int4_awq" else 0.1)
        assert abs(r["perplexity"] / rows["none"]["perplexity"] - 1) < 0.05
        assert (
            r["weight_bytes"] < 0.4 * rows["none"]["weight_bytes"]
        )  # fp32 -> 8 bits or fewer (+ fp32 embeddings)
    assert rows["int4_awq"]["weight_bytes"] < rows["fp8"]["weight_bytes"]
    report = (quantized / "report.md").read_text()
    for name, r in rows.items():
        line = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(r["accuracy"], abs=1e-3)
        assert float(cells[2]) == pytest.approx(r["perplexity"], abs=1e-4)
        assert int(cells[5].replace(",", "")) == r["weight_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_FORMATS)
def test_the_saved_state_and_the_export_read_back_evaluate_the_same(quantized, name):
    """mto.restore of modelopt_state.pth onto a fresh source model gives the in-memory fake-quantized
    model's numbers exactly; the unified HF checkpoint reads back with its quantization config and gives
    them too: the same quantized weights and scales, up to fp32 rounding (int4_awq included: rl quantize
    re-smooths the linears that share an input before it evaluates, so what it reports is what it exports)."""
    from algorithms.quantize import QuantizeConfig, check_inputs, evaluate, load_exported, restore_fake_quant
    from rl.config import load_config

    cfg = load_config(QuantizeConfig, str(quantized / "config.yaml"))
    inputs = check_inputs(cfg)
    want = rows_of(quantized)[name]
    restored = evaluate(
        restore_fake_quant(quantized / "source_hf", quantized / name / "modelopt_state.pth"),
        inputs.tokenizer,
        inputs.eval_rows,
        cfg.eval,
    )
    assert restored["accuracy"] == want["accuracy"]
    assert restored["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    hf = quantized / name / "hf"
    quant = json.loads((hf / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "modelopt" and re.match(r"FP8|W8A8|W4A16", quant["quant_algo"])
    exported = evaluate(load_exported(hf), inputs.tokenizer, inputs.eval_rows, cfg.eval)
    assert exported["accuracy"] == want["export_accuracy"]
    assert exported["perplexity"] == pytest.approx(want["export_perplexity"], rel=1e-6)
    # The evaluated model is the exported one (int4_awq: re-smoothed before evaluation, as the export
    # needs); only fp32 rounding of the folded smoothing scales differs (int8_sq: ~4e-5).
    assert exported["accuracy"] == want["accuracy"]
    assert exported["perplexity"] == pytest.approx(want["perplexity"], rel=1e-3)


# ---- QAT building block: our GPTModel's parallel linears under ModelOpt ---------------------------------


@pytest.mark.slow
def test_modelopt_quantizes_our_parallel_linears_trains_and_restores(tmp_path):
    """After register_parallel_linears, mtq.quantize inserts calibrated quantizers into every
    ColumnParallelLinear/RowParallelLinear of our GPTModel (the output layer stays unquantized, as the
    recipes say); the fake-quantized forward stays near the fp32 one, gradients reach the weights through
    the straight-through estimator (so a QAT step changes them), and mto.restore onto a fresh model gives
    the same logits."""
    import copy

    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq
    from tiny_llama import tiny_llama_config

    from algorithms.quantize import register_parallel_linears
    from core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from core.transformer.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(tiny_llama_config())
    tokens = torch.randint(0, 64, (4, 16))
    reference = model(tokens).detach()
    register_parallel_linears()
    model = mtq.quantize(model, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: m(tokens))
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)
    }
    assert len(linears) == 4 * 2 + 1  # qkv, proj, fc1, fc2 per layer + the output layer
    for name, module in linears.items():
        on = name != "output_layer"
        assert module.weight_quantizer.is_enabled == on and module.input_quantizer.is_enabled == on, name
        if on:
            assert module.input_quantizer.amax is not None and module.weight_quantizer.amax is not None
    logits = model(tokens)
    error = (logits - reference).abs().max().item()
    assert 0 < error < 0.1 * reference.abs().max().item()  # quantized: not the fp32 numbers, but near them

    fc1 = linears["layers.0.mlp.linear_fc1"]
    before = fc1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert fc1.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(before, fc1.weight)

    mto.save(model, str(tmp_path / "modelopt_state.pth"))
    restored = mto.restore(GPTModel(tiny_llama_config()), str(tmp_path / "modelopt_state.pth"))
    torch.testing.assert_close(restored(tokens), model(tokens), rtol=0, atol=0)


# ---- the CUDA formats' exports, read back (the formats run on a GPU; their packing is checked here) ------


def test_a_w4a8_awq_export_reads_back_as_the_model_in_memory(tmp_path):
    """w4a8_awq (int4 blocks of 128, then an fp8 step per tensor; fp8 activations) calibrates and exports
    on the CPU too: load_exported gives the exported model's logits exactly (weight_scale -> the int4
    quantizer, weight_scale_2 -> the fp8 one)."""
    import copy
    import dataclasses

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    from tiny_llama import tiny_llama_config

    from algorithms.quantize import load_exported, load_hf_model
    from core.bridge import save_hf
    from core.transformer.model import GPTModel

    config = dataclasses.replace(
        tiny_llama_config(num_kv_heads=1, init_std=None), hidden_size=128, ffn_hidden_size=256, head_dim=64
    )
    torch.manual_seed(0)
    save_hf(GPTModel(config), tmp_path / "source")
    model = load_hf_model(tmp_path / "source")
    tokens = torch.randint(0, 64, (4, 16))
    model = mtq.quantize(model, copy.deepcopy(mtq.W4A8_AWQ_BETA_CFG), lambda m: m(tokens))
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)  # what the export does first (rl quantize does too)
        want = model(input_ids=tokens).logits
        export_hf_checkpoint(model, export_dir=tmp_path / "w4a8")
        saved = json.loads((tmp_path / "w4a8/hf_quant_config.json").read_text())["quantization"]
        assert saved["quant_algo"] == "W4A8_AWQ"
        got = load_exported(tmp_path / "w4a8")(input_ids=tokens, use_cache=False).logits
    assert torch.equal(got, want)


def test_nvfp4_weights_unpack_like_modelopt():
    """nvfp4's packed weight (two E2M1 nibbles per byte, low first) times its fp8 16-block scales and the
    per-tensor weight_scale_2 is ModelOpt's own dequantization."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from algorithms.quantize import _dequantize

    torch.manual_seed(0)
    weight = torch.randn(8, 64)
    packed, scale, scale_2 = NVFP4QTensor.quantize(weight, 16)
    want = packed.dequantize(torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    got = _dequantize(packed._quantized_data, scale, scale_2)
    assert scale.dtype == torch.float8_e4m3fn and torch.equal(got, want)
    assert (got - weight).abs().max() < 0.5 * weight.abs().max()  # a 4-bit copy of the weight, not noise
