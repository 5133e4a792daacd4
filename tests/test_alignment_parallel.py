"""SFT and DPO on the shared trainer at tp2, pp2 and dp2 (gloo) give the single process's loss curve
(fp32, within 1e-5), and so does SFT with LoRA at tp2. One 2-rank world runs every layout in turn (each
with its own process groups and run directory); the single-process curves are computed here.

Why 1e-5: the layouts reorder float sums (tp splits the vocabulary's log-sum-exp and the row-parallel
matmuls, dp splits the micro-batches), which moves fp32 losses by ~1e-7 per step; three AdamW steps of a
tiny model stay far inside 1e-5. A wrong normaliser, a dropped micro-batch or a pair split across
ranks moves them by 1e-2 or more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist import run_distributed
from tiny_llama import save_random_tiny_llama

STEPS = 3
LAYOUTS = {"tp2": {"tp": 2}, "pp2": {"pp": 2}, "dp2": {"dp": 2}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    from core.data.synthetic import generate_arithmetic, save_char_tokenizer, write_sft_chat_data

    root = tmp_path_factory.mktemp("alignment_parallel")
    tok = save_char_tokenizer(root / "tokenizer")
    model = save_random_tiny_llama(root / "model", tokenizer_dir=tok)
    corpus = write_sft_chat_data(root / "sft", 64, 8, seed=0)
    train, _ = generate_arithmetic(64, 1, seed=1)
    pairs = [
        {"prompt": p.prompt, "chosen": p.answer, "rejected": str(int(p.answer) + 1 + i % 7)}
        for i, p in enumerate(train)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return {
        "root": str(root),
        "model": str(model),
        "sft": str(corpus.train),
        "pairs": str(root / "pairs.jsonl"),
    }


def _sft_cfg(inputs: dict[str, str], run_dir: str, parallel: dict, lora: bool = False):
    from algorithms.sft import SFTConfig

    cfg = {
        "run": {"dir": run_dir},
        "model": {"init_from": inputs["model"]},
        "data": {"path": inputs["sft"], "seq_len": 32},
        "train": {
            "max_steps": STEPS,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "progress_bar": False,
            "device": "cpu",
        },
        "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0},
        "parallel": parallel,
        "precision": {"dtype": "fp32"},
    }
    if lora:
        cfg["lora"] = {"rank": 4, "alpha": 8}
    return SFTConfig.model_validate(cfg)


def _dpo_cfg(inputs: dict[str, str], run_dir: str, parallel: dict):
    from algorithms.dpo import DPOConfig

    return DPOConfig.model_validate(
        {
            "run": {"dir": run_dir},
            "model": {"init_from": inputs["model"]},
            "data": {"path": inputs["pairs"], "max_len": 16},
            "train": {
                "max_steps": STEPS,
                "global_batch_size": 8,
                "micro_batch_size": 2,
                "progress_bar": False,
                "device": "cpu",
            },
            "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0},
            "algorithm": {"loss": "sigmoid", "beta": 0.5, "rpo_alpha": 0.5},
            "parallel": parallel,
            "precision": {"dtype": "fp32"},
        }
    )


def _curve(trainer_cls, cfg, groups=None, rank: int = 0) -> list[float]:
    trainer = trainer_cls(cfg, groups, rank)
    key = "train/loss"
    return [trainer.advance()[key] for _ in range(STEPS)]


def _all_layouts(rank: int, world_size: int, inputs: dict[str, str]) -> dict[str, list[float]]:
    from algorithms.dpo import DPOTrainer
    from algorithms.sft import SFTTrainer
    from core.config import ParallelConfig
    from core.parallel.dims import build_groups

    out = {}
    for name, parallel in LAYOUTS.items():
        groups = build_groups(ParallelConfig(**parallel).dims(), rank)
        root = Path(inputs["root"]) / f"rank{rank}"
        out[f"sft_{name}"] = _curve(
            SFTTrainer, _sft_cfg(inputs, str(root / f"sft_{name}"), parallel), groups, rank
        )
        out[f"dpo_{name}"] = _curve(
            DPOTrainer, _dpo_cfg(inputs, str(root / f"dpo_{name}"), parallel), groups, rank
        )
    groups = build_groups(ParallelConfig(tp=2).dims(), rank)
    cfg = _sft_cfg(inputs, str(Path(inputs["root"]) / f"rank{rank}" / "lora_tp2"), {"tp": 2}, lora=True)
    out["lora_tp2"] = _curve(SFTTrainer, cfg, groups, rank)
    return out


@pytest.mark.slow
def test_sft_dpo_and_lora_layouts_match_the_single_process(inputs):
    from algorithms.dpo import DPOTrainer
    from algorithms.sft import SFTTrainer

    root = Path(inputs["root"]) / "single"
    want = {
        "sft": _curve(SFTTrainer, _sft_cfg(inputs, str(root / "sft"), {})),
        "dpo": _curve(DPOTrainer, _dpo_cfg(inputs, str(root / "dpo"), {})),
        "lora": _curve(SFTTrainer, _sft_cfg(inputs, str(root / "lora"), {}, lora=True)),
    }
    assert want["sft"][-1] < want["sft"][0] and want["dpo"][-1] < want["dpo"][0]  # they train
    assert abs(want["lora"][0] - want["sft"][0]) < 1e-6  # B = 0: the adapters start as the base model
    results = run_distributed(_all_layouts, 2, inputs, timeout=600)
    for got in results:  # every rank reports the same global loss
        for name in LAYOUTS:
            for loop in ("sft", "dpo"):
                curve = got[f"{loop}_{name}"]
                assert all(abs(a - b) < 1e-5 for a, b in zip(curve, want[loop], strict=True)), (
                    loop,
                    name,
                    curve,
                    want[loop],
                )
        assert all(abs(a - b) < 1e-5 for a, b in zip(got["lora_tp2"], want["lora"], strict=True)), (
            got["lora_tp2"],
            want["lora"],
        )
