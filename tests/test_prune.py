"""Structured pruning (rl prune): the cut keeps exactly the parts it names (a pruned model computes what the
full one computes with the dropped heads / channels / layers zeroed out), the least important parts are
the ones dropped, and `rl prune` writes a smaller model in our format and hf/ that transformers loads with
the same logits; impossible targets are refused in one line with exit 2, nothing written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from algorithms.prune import PruneTarget, importance, prune, target_config
from core.config import ParallelConfig
from core.models import preset
from core.transformer.model import GPTModel

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    config = dataclasses.replace(
        preset("llama_tiny"),
        vocab_size=64,
        hidden_size=64,
        num_layers=3,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_hidden_size=96,
        max_position_embeddings=64,
    )
    return GPTModel(config).eval()


def _rows(n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, 64, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def _logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids))


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))


def test_pruning_to_the_same_shape_is_the_identity():
    model = _model()
    pruned = prune(model, model.config, importance(model, _rows()))
    torch.testing.assert_close(_logits(pruned, IDS), _logits(model, IDS), atol=1e-6, rtol=0)


def test_pruned_heads_and_channels_compute_the_full_model_with_them_zeroed():
    """Width pruning of heads (per GQA group) and MLP channels is exactly the full model with the dropped
    heads' linear_proj columns and the dropped channels' linear_fc2 columns zeroed."""
    model = _model()
    stats = importance(model, _rows())
    target = PruneTarget(num_attention_heads=2, ffn_hidden_size=40)
    pruned = prune(model, target_config(model.config, target, ParallelConfig()), stats)
    reference = _model()
    d = model.config.head_dim
    for i, layer in enumerate(reference.layers.values()):
        heads = stats["heads"][i].view(2, 2)  # (kv groups, heads per group)
        for g in range(2):
            dropped = g * 2 + int(heads[g].argmin())
            layer.self_attention.linear_proj.weight.data[:, dropped * d : (dropped + 1) * d] = 0
        channels = stats["ffn"][i].argsort()[: 96 - 40]
        layer.mlp.linear_fc2.weight.data[:, channels] = 0
    assert pruned.config.num_attention_heads == 2 and pruned.config.num_kv_heads == 2
    torch.testing.assert_close(_logits(pruned, IDS), _logits(reference, IDS), atol=1e-5, rtol=0)


def test_a_layer_that_does_nothing_is_the_one_dropped():
    model = _model()
    idle = model.layers["1"]
    idle.self_attention.linear_proj.weight.data.zero_()
    idle.mlp.linear_fc2.weight.data.zero_()  # the residual stream passes through unchanged
    stats = importance(model, _rows())
    assert int(stats["layers"].argmin()) == 1 and stats["layers"][1] < 1e-6
    pruned = prune(model, target_config(model.config, PruneTarget(num_layers=2), ParallelConfig()), stats)
    torch.testing.assert_close(_logits(pruned, IDS), _logits(model, IDS), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny HF model with the arithmetic char tokenizer."""
    from core.bridge import save_hf
    from core.data.synthetic import save_char_tokenizer

    root = tmp_path_factory.mktemp("prune")
    tokenizer_dir = root / "tokenizer"
    save_char_tokenizer(tokenizer_dir)
    save_hf(_model(), root / "hf", arch="llama", tokenizer_dir=tokenizer_dir)
    return root / "hf"


def _rl_prune(source: Path, run_dir: Path, *overrides: str) -> int:
    from rl.cli import main

    return main(
        [
            "prune",
            str(ROOT / "configs/prune_tiny.yaml"),
            f"run.dir={run_dir}",
            f"model.init_from={source}",
            "target.hidden_size=48",
            "target.ffn_hidden_size=64",
            *overrides,
        ]
    )


@pytest.mark.slow  # transformers import + a CLI run: ~30 s
def test_rl_prune_writes_a_smaller_model_that_transformers_loads_with_our_logits(source, tmp_path):
    from transformers import AutoModelForCausalLM

    from algorithms.rl_inputs import load_init, resolve_init

    assert _rl_prune(source, tmp_path / "run", "calibration_rows=16") == 0
    ours, _ = load_init(resolve_init(tmp_path / "run/model"))
    assert (ours.config.num_layers, ours.config.hidden_size, ours.config.ffn_hidden_size) == (2, 48, 64)
    assert ours.config.num_attention_heads == 2 and ours.config.head_dim == 16
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run/hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(IDS).logits
    torch.testing.assert_close(theirs, _logits(ours.eval(), IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("target.num_layers=4", "larger than the model's num_layers=3"),
        ("target.num_attention_heads=3", "not a multiple of num_kv_heads=2"),
        ("parallel.tp=4", "not divisible by parallel.tp=4"),
    ],
)
def test_impossible_targets_are_refused_in_one_line(source, tmp_path, capsys, override, message):
    assert _rl_prune(source, tmp_path / "run", override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()
