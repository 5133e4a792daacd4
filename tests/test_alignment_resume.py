"""A resumed SFT / DPO run continues exactly where the uninterrupted one was: model, optimizer, LR
schedule, data position and (DPO) the precomputed reference logprobs all come back from step_N."""

from __future__ import annotations

import pytest
import test_alignment_parallel as setup

inputs = setup.inputs  # the same tiny model, chat rows and pairs (module fixture)


@pytest.mark.parametrize("loop", ["sft", "dpo"])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_losses(inputs, tmp_path, loop):
    from algorithms.dpo import DPOTrainer
    from algorithms.sft import SFTTrainer

    trainer_cls, make = (SFTTrainer, setup._sft_cfg) if loop == "sft" else (DPOTrainer, setup._dpo_cfg)
    straight = trainer_cls(make(inputs, str(tmp_path / "straight"), {}))
    want = [straight.advance()["train/loss"] for _ in range(setup.STEPS)]

    first = trainer_cls(make(inputs, str(tmp_path / "resumed"), {}))
    got = [first.advance()["train/loss"]]
    first.save()  # step_1, then the process "dies"
    first.advance()  # work after the checkpoint is lost
    resumed = trainer_cls(make(inputs, str(tmp_path / "resumed"), {}))
    assert resumed.step_count == 1
    got += [resumed.advance()["train/loss"] for _ in range(setup.STEPS - 1)]
    assert got == want
