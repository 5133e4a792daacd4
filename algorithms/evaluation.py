"""Held-out evaluation during training: greedy completions scored by a verifier, and held-out loss."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch


@torch.no_grad()
def greedy_complete(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int | None,
    device: torch.device,
) -> list[list[int]]:
    """Greedy continuations without a KV cache (short evaluation prompts only).

    Prompts are grouped by length so that a batch needs no padding; logits are full-vocab (tp=1).
    """
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for idx in by_len.values():
        ids = torch.tensor([prompts[i] for i in idx], device=device)  # (B, T0)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            next_ids = model(ids)[:, -1].argmax(-1)  # (B,)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if eos_id is not None:
                done |= next_ids == eos_id
                if bool(done.all()):
                    break
        for row, i in enumerate(idx):
            new = ids[row, len(prompts[i]) :].tolist()
            if eos_id is not None and eos_id in new:
                new = new[: new.index(eos_id)]
            out[i] = new
    return out


def accuracy(
    model: torch.nn.Module,
    tokenizer,
    problems: list[dict[str, str]],
    score: Callable[[str, str], bool],
    max_new_tokens: int,
    device: torch.device,
) -> float:
    """Fraction of held-out problems whose greedy completion the verifier accepts."""
    was_training = model.training
    model.eval()
    prompts = [encode_prompt(tokenizer, p["prompt"]) for p in problems]
    completions = greedy_complete(model, prompts, max_new_tokens, tokenizer.eos_token_id, device)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    model.train(was_training)
    return sum(score(p["prompt"], t) for p, t in zip(problems, texts)) / max(1, len(problems))


def encode_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
