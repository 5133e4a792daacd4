"""Trainer-side logprobs of sampled responses, and how far they are from the sampler's.

`recompute_logprobs` teacher-forces (prompt + response) through our GPTModel and picks
log_softmax(logits)[next token] at temperature 1: the same quantity as the engines' raw sampler
logprobs (vLLM raw_logprobs, NativeEngine). Under TP the logits stay vocab-sharded (B, T, V/tp):
`vocab_parallel_logprobs` all-reduces (B, T) statistics only, never the full vocabulary.

Rows of a batch are right-padded: causal attention means padding after a row's last token cannot
change that row's logits, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from core.errors import InputError
from core.tensor_parallel import vocab_parallel_logprobs
from core.transformer.model import GPTModel

Sequences = Sequence[tuple[Sequence[int], Sequence[int]]]  # (prompt_ids, response_ids) per row


def _check_sequences(sequences: Sequences) -> None:
    for i, (prompt, response) in enumerate(sequences):
        if len(prompt) < 1:
            raise InputError(f"sequence {i}: prompt_ids is empty (the first response token needs context)")
        if len(response) < 1:
            raise InputError(f"sequence {i}: response_ids is empty")


def _padded_batch(rows: Sequences, device: torch.device) -> torch.Tensor:
    """(B, T_max) int64 of prompt + response, right-padded with token 0."""
    lengths = [len(p) + len(r) for p, r in rows]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for b, (prompt, response) in enumerate(rows):
        ids[b, : lengths[b]] = torch.tensor([*prompt, *response], dtype=torch.long)
    return ids.to(device)


@torch.no_grad()
def _batch_logprobs(
    model: GPTModel, rows: Sequences, tp_group: dist.ProcessGroup | None
) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    ids = _padded_batch(rows, device)  # (B, T)
    logits = model(ids)  # (B, T, V/tp)
    token_lps = vocab_parallel_logprobs(logits[:, :-1], ids[:, 1:], tp_group)  # (B, T-1) fp32
    out = []
    for b, (prompt, response) in enumerate(rows):
        start = len(prompt) - 1  # logits at position t predict token t + 1
        out.append(token_lps[b, start : start + len(response)].cpu())
    return out


def recompute_logprobs(
    model: GPTModel,
    sequences: Sequences,
    tp_group: dist.ProcessGroup | None = None,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Teacher-forced logprobs of each response's tokens under `model`: one fp32 (len(response),)
    CPU tensor per sequence, in order.

    model: a whole model (pre_process and post_process; not a pipeline stage) in eval mode for the
    call. tp_group: the model's tensor-parallel group; every TP rank calls with the same sequences.
    """
    if not (model.pre_process and model.post_process):
        raise InputError("recompute_logprobs needs a whole model (not a pipeline stage)")
    _check_sequences(sequences)
    was_training = model.training
    model.eval()
    try:
        out: list[torch.Tensor] = []
        for start in range(0, len(sequences), batch_size):
            out.extend(_batch_logprobs(model, sequences[start : start + batch_size], tp_group))
        return out
    finally:
        model.train(was_training)


def logprob_gap(
    sampler_lps: Sequence[Sequence[float] | torch.Tensor],
    trainer_lps: Sequence[Sequence[float] | torch.Tensor],
) -> dict[str, float]:
    """Per-token mismatch between sampler and trainer logprobs over all sequences (float64 math).

    mean_abs / max_abs: |trainer - sampler|; ratio_mean / ratio_min / ratio_max: the importance ratio
    exp(trainer - sampler) that an off-policy correction would apply; num_tokens.
    """
    if len(sampler_lps) != len(trainer_lps):
        raise InputError(f"logprob_gap: {len(sampler_lps)} sampler rows vs {len(trainer_lps)} trainer rows")
    diffs = []
    for i, (s, t) in enumerate(zip(sampler_lps, trainer_lps)):
        s64 = torch.as_tensor(s, dtype=torch.float64).flatten()
        t64 = torch.as_tensor(t, dtype=torch.float64).flatten()
        if s64.shape != t64.shape:
            raise InputError(
                f"logprob_gap: row {i} has {s64.numel()} sampler vs {t64.numel()} trainer tokens"
            )
        diffs.append(t64 - s64)
    diff = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    if diff.numel() == 0:
        raise InputError("logprob_gap: no tokens to compare")
    ratio = diff.exp()
    return {
        "mean_abs": float(diff.abs().mean()),
        "max_abs": float(diff.abs().max()),
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "num_tokens": float(diff.numel()),
    }
