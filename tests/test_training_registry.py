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
