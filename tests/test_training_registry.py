"""The registry of training commands and the restart-from-checkpoint policy every loop shares."""

from __future__ import annotations

import pytest

from core.errors import InputError
from rl.training import TRAINING_COMMANDS, with_restarts


def test_every_loop_registers_a_schema_a_check_and_a_runner():
    assert set(TRAINING_COMMANDS) >= {"pretrain", "sft", "dpo", "rm", "grpo"}
    for command in TRAINING_COMMANDS.values():
        schema = command.load_schema()
        assert {"run", "train", "optim", "parallel", "placement", "failure", "ray"} <= set(
            schema.model_fields
        )
        assert (command.trainer is None) != (command.run is None), command.name
        assert (command.check is None) == (command.trainer is None), command.name  # run commands check


def test_a_crash_restarts_from_the_checkpoint_bad_input_does_not():
    calls = []

    def crashes_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("worker lost")
        return "done"

    assert with_restarts(crashes_once, 1, "rl sft ...") == "done" and len(calls) == 2
    calls.clear()
    with pytest.raises(RuntimeError, match="worker lost"):
        with_restarts(lambda: crashes_once() and crashes_once(), 0, "rl sft ...")

    def bad_input() -> None:
        calls.append(1)
        raise InputError("data.path: not found")

    calls.clear()
    with pytest.raises(InputError):
        with_restarts(bad_input, 3, "rl sft ...")
    assert len(calls) == 1  # a restart would only repeat it


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SMALL = [
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.num_kv_heads=1",
    "model.ffn_hidden_size=128",
    "data.seq_len=32",
    "data.synthetic.n_train=500",
    "data.synthetic.n_eval=10",
    "eval.num_problems=5",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.eval_every=0",
    "train.progress_bar=false",
]


def test_a_diverging_run_stops_before_saving_and_keeps_its_good_checkpoints(tmp_path, capsys):
    """lr=1e3: within a few steps the update is inf/nan; such steps are skipped, and train.max_bad_steps (3)
    of them in a row stop the run with one line (exit 3) naming the newest good checkpoint, which stays on
    disk, finite, and nothing of the diverged state is written (no checkpoint of those steps, no hf/)."""
    import re

    import torch

    from core.checkpoint.sharded import load_full_state
    from rl.cli import main

    run_dir = tmp_path / "run"
    argv = ["pretrain", str(ROOT / "configs/pretrain_tiny.yaml"), *SMALL, f"run.dir={run_dir}"]
    code = main([*argv, "optim.lr=1e3", "optim.min_lr=1", "train.max_steps=20", "train.save_every=1"])
    err = capsys.readouterr().err.strip().splitlines()
    found = re.match(
        r"error: train/(?:loss|grad_norm)=(?:inf|nan) at step (\d+), 3 bad steps in a row", err[-1]
    )
    assert code == 3 and found and "the run diverged" in err[-1], err
    good = int(found.group(1)) - 3  # the step before the three bad ones
    assert f"checkpoints/step_{good} is the newest good checkpoint" in err[-1]
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept[-1] == f"step_{good}", kept
    assert not (run_dir / "hf").exists()
    state = load_full_state(run_dir / f"checkpoints/step_{good}/model")
    assert all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t))


def test_resume_with_another_model_or_stage_stops_before_writing(tmp_path, capsys):
    from rl.cli import main

    run_dir = tmp_path / "run"
    argv = [
        "pretrain",
        str(ROOT / "configs/pretrain_tiny.yaml"),
        *SMALL,
        f"run.dir={run_dir}",
        "train.max_steps=2",
    ]
    assert main(argv) == 0
    config_before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    assert main([*argv, "model.hidden_size=96", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.hidden_size: 64 -> 96" in err[0], err
    assert (run_dir / "config.yaml").read_text() == config_before  # nothing overwritten
    sft = ["sft", str(ROOT / "configs/sft_tiny.yaml"), f"run.dir={run_dir}", f"model.init_from={run_dir}"]
    assert main([*sft, "data.synthetic.n_train=50", "train.progress_bar=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "of an `rl pretrain` run" in err[0], err


def test_grpo_refuses_a_tokenizer_past_the_vocabulary_and_a_resume_over_other_prompts(tmp_path, capsys):
    import dataclasses
    import json
    import shutil

    import torch
    from tiny_llama import save_random_tiny_llama, tiny_llama_config

    from core.bridge import save_hf
    from core.data.synthetic import generate_arithmetic, save_char_tokenizer
    from core.transformer.model import GPTModel
    from rl.cli import main

    tok = save_char_tokenizer(tmp_path / "tokenizer")
    model = save_random_tiny_llama(tmp_path / "model", tokenizer_dir=tok)
    torch.manual_seed(0)
    small = tmp_path / "small_vocab"
    save_hf(GPTModel(dataclasses.replace(tiny_llama_config(), vocab_size=16)), small, tokenizer_dir=tok)
    problems, _ = generate_arithmetic(32, 1, seed=0)
    rows = [{"prompt": p.prompt, "answer": p.answer} for p in problems]
    for name, part in (("all", rows), ("half", rows[:16])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    run_dir = tmp_path / "run"
    argv = [
        "grpo",
        str(ROOT / "configs/grpo_tiny.yaml"),
        f"run.dir={run_dir}",
        "data.synthetic=null",
        "train.max_steps=1",
        "train.eval_every=0",
        "rollout.prompts_per_step=4",
        "train.global_batch_size=32",
        "train.micro_batch_size=32",
        "train.progress_bar=false",
    ]
    assert main([*argv, f"model.init_from={small}", f"data.path={tmp_path / 'all.jsonl'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than the model's vocab_size=16" in err[0], err
    assert not run_dir.exists()

    assert main([*argv, f"model.init_from={model}", f"data.path={tmp_path / 'all.jsonl'}"]) == 0
    config_before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    resumed = [*argv, f"model.init_from={model}", f"data.path={tmp_path / 'half.jsonl'}", "train.max_steps=2"]
    assert main(resumed) == 2  # another data.path: the config check names it
    err = capsys.readouterr().err.strip().splitlines()
    changed = f"data.path: {tmp_path / 'all.jsonl'} -> {tmp_path / 'half.jsonl'}"
    assert len(err) == 1 and changed in err[0], err
    shutil.copyfile(tmp_path / "half.jsonl", tmp_path / "all.jsonl")  # the same data.path, other rows
    assert main([*argv, f"model.init_from={model}", f"data.path={tmp_path / 'all.jsonl'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written over 32 rows but the data now has 16" in err[0], err
    assert (run_dir / "config.yaml").read_text() == config_before
