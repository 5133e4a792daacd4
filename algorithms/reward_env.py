"""`environment.name: reward_model`: rollouts scored by a reward model trained with `rl rm`.

The reward is the model's score of prompt + response (the response closed by EOS when the sampler
stopped it, as the pairs it was trained on were). `correct` has no meaning for a learned reward: it is
reported when the rows carry an "answer" that a verifier can check (the embedded arithmetic task),
else it is `score > 0`. The scorer is anything with `scores(batch) -> {"scores": (B,)}`: on Ray a
RewardModelWorker group (rl/grpo_cluster.py passes it in); in this process a RewardModel
(algorithms/critic.py), loaded at the first scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rollout.environments import Completion, Score


class RewardModelEnvironment:
    """Scores completions with a value-head model (see the module docstring)."""

    def __init__(
        self, path: str, tokenizer: Any, verifier: Any = None, scorer: Any = None, micro_batch_size: int = 64
    ) -> None:
        from algorithms.rl_inputs import init_config, resolve_init
        from core.errors import InputError

        self.source = resolve_init(path)
        if init_config(self.source).head != "value":
            raise InputError(f"environment.path: {path} is a language model, not a reward model (`rl rm`)")
        self.tokenizer, self.verifier, self.scorer = tokenizer, verifier, scorer
        self.micro_batch_size = micro_batch_size

    def _scorer(self) -> Any:
        if self.scorer is None:
            from algorithms.critic import RewardModel
            from algorithms.rl_inputs import load_init_model

            model = load_init_model(self.source)
            pad = self.tokenizer.pad_token_id or 0
            self.scorer = RewardModel.build(
                model.config, model.state_dict(), micro_batch_size=self.micro_batch_size, pad_id=pad
            )
        return self.scorer

    def check_row(self, row: Any, where: str) -> None:
        return None

    def encode(self, completion: Completion) -> list[int]:
        from algorithms.evaluation import encode_prompt

        tok = self.tokenizer
        ids = (
            encode_prompt(tok, completion.prompt)
            + tok(completion.text, add_special_tokens=False)["input_ids"]
        )
        if completion.finish_reason == "stop" and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        return ids

    @torch.no_grad()
    def score(self, completions: Sequence[Completion]) -> list[Score]:
        rows = [self.encode(c) for c in completions]
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        scores = self._scorer().scores({"input_ids": ids, "attention_mask": mask})["scores"].tolist()
        out = []
        for c, s in zip(completions, scores, strict=True):
            judged = self.verifier.judge(c) if self.verifier is not None else (s > 0, True)
            out.append(Score(float(s), bool(judged[0]), bool(judged[1])))
        return out
