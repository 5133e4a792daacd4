"""The SPMD loops on Ray: `rl sft` with a placement runs its ranks as a Ray worker group (TrainerWorker
actors forming a gloo world) and gives exactly the in-process loss curve of the same layout; a rank
killed mid-run, with failure.max_restarts, is replaced and the run resumes from its newest checkpoint."""

from __future__ import annotations

import json

import pytest
from ray_local import local_ray
from tiny_llama import save_random_tiny_llama

from core.utils.metrics import read_metrics

STEPS = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from core.data.synthetic import save_char_tokenizer, write_sft_chat_data

    root = tmp_path_factory.mktemp("spmd_ray")
    tok = save_char_tokenizer(root / "tokenizer")
    model = save_random_tiny_llama(root / "model", tokenizer_dir=tok)
    corpus = write_sft_chat_data(root / "sft", 64, 8, seed=0)
    return {"model": str(model), "data": str(corpus.train), "eval": str(corpus.eval)}


def _cfg(inputs, run_dir, **sections):
    from algorithms.sft import SFTConfig

    return SFTConfig.model_validate(
        {
            "run": {"dir": str(run_dir)},
            "model": {"init_from": inputs["model"]},
            "data": {"path": inputs["data"], "eval_path": inputs["eval"], "seq_len": 32},
            "train": {
                "max_steps": STEPS,
                "global_batch_size": 8,
                "micro_batch_size": 2,
                "save_every": 2,
                "log_every": 1,
                "progress_bar": False,
                "device": "cpu",
            },
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "precision": {"dtype": "fp32"},
            **sections,
        }
    )


@pytest.mark.slow
def test_sft_on_a_ray_worker_group_matches_the_in_process_run(inputs, tmp_path):
    from algorithms.engine_trainer import run_spmd
    from algorithms.sft import SFTTrainer
    from rl.spmd_cluster import run_spmd_on_ray

    local = tmp_path / "local"
    run_spmd(SFTTrainer, _cfg(inputs, local, parallel={"dp": 2}))
    on_ray = tmp_path / "ray"
    cfg = _cfg(inputs, on_ray, parallel={"dp": 2}, placement={"num_bundles": 2})
    assert cfg.on_ray
    with local_ray(object_store_mb=256, num_cpus=2):
        run_spmd_on_ray(SFTTrainer, cfg, "rl sft ...")
    want = [(r["step"], r.get("train/loss")) for r in read_metrics(local)]
    got = [(r["step"], r.get("train/loss")) for r in read_metrics(on_ray)]
    assert got == want and len(want) == STEPS  # every step, the same losses
    meta = json.loads((on_ray / f"checkpoints/step_{STEPS}/meta.json").read_text())
    assert meta["stage"] == "sft" and (on_ray / "hf/model.safetensors").is_file()
