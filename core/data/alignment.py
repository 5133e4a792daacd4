"""Data for SFT, DPO and reward-model training: rows from files, tokenized with loss masks, SFT packing.

Rows come from JSON lines, parquet or a `datasets` save_to_disk directory, each paired with where it came
from (`path:LINE` or `path: row N`), so that a bad row is reported as one line naming it.

Tokenization, shared by SFT and preference rows:
  - Text is encoded with add_special_tokens=False: the chat template, or this module, writes the special
    tokens. BOS is prepended when the tokenizer has one and the text does not already start with it
    (as algorithms/evaluation.encode_prompt does for generation), so an arithmetic chat tokenizes exactly
    as its pretraining document `<bos>12+34=46<eos>`.
  - A response (completion, assistant turn) ends with EOS: appended to plain-text completions; in a chat,
    the template's own end of turn, and anything the template writes after the turn's last EOS (e.g. a
    newline before the next turn) is not part of the response, since the model never generates it.
  - Chats are rendered with the tokenizer's own template only (no DEFAULT_CHAT_TEMPLATE fallback: a model
    would be trained on a format nobody serves). Assistant tokens are found by rendering prefixes of the
    conversation, which needs a prefix-stable template; one that is not is an error, never a guess.
Length policy (`max_len` tokens per example, prompt + response): truncation "off" makes a longer example
an InputError naming the row and its length; "right" keeps the first max_len tokens, and an example left
with no target token (its prompt fills max_len) is an InputError.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from core.data.datasets import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    RecordFields,
    _load_from_disk,
    _one_line,
    check_record,
    jsonl_lines,
)
from core.data.pretrain_dataset import Sample, _cached
from core.data.tokenizer import validate_messages
from core.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Truncation = Literal["off", "right"]
Row = tuple[dict[str, Any], str]  # (record, where it came from: "path:LINE" or "path: row N")
CHAT_FIELDS = RecordFields(messages="messages")
COMPLETION_KEYS = ("completion", "response")

# ---------------------------------------------------------------------------------------------- reading


def read_rows(path: str | Path, split: str = "train") -> list[Row]:
    """All rows of a .jsonl/.json (JSON lines) or .parquet file or a save_to_disk directory, with where each is.

    `split` picks the split of a directory holding a DatasetDict. Blank JSON lines are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: dataset not found")
    if path.is_dir():
        rows = _table_rows(path, _load_from_disk(path, split).to_list())
    elif path.suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(path)
    elif path.suffix in PARQUET_SUFFIXES:
        rows = _parquet_rows(path)
    else:
        raise InputError(
            f"{path}: unsupported dataset format (expected .jsonl, .json, .parquet or a directory)"
        )
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def _jsonl_rows(path: Path) -> list[Row]:
    rows = []
    for where, line in jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
        rows.append((record, where))
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    """Straight through pyarrow: `datasets` would build an Arrow cache, and refuses a file with no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read parquet: {_one_line(e)}") from e
    return _table_rows(path, table.to_pylist())


def _table_rows(path: Path, records: list[dict[str, Any]]) -> list[Row]:
    return [(record, f"{path}: row {i}") for i, record in enumerate(records)]


def _present(record: dict[str, Any], key: str) -> bool:
    """A parquet column is in every row; a row that lacks the field holds None there."""
    return record.get(key) is not None


# ----------------------------------------------------------------------------------------- tokenization


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def _eos_id(tokenizer: PreTrainedTokenizerBase, where: str) -> int:
    if tokenizer.eos_token_id is None:
        raise InputError(f"{where}: the tokenizer has no eos_token to end the response with")
    return tokenizer.eos_token_id


def _require_chat_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{where}: rows have `messages` but the tokenizer at {tokenizer.name_or_path} has no chat template"
        )


def _render_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    where: str,
    add_generation_prompt: bool = False,
) -> list[int]:
    """Token ids of a (validated, non-empty) conversation through the tokenizer's own chat template."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except TemplateError as e:
        raise InputError(f"{where}: chat template failed: {' '.join(str(e).split())}") from e
    return _with_bos(tokenizer, _encode(tokenizer, text))


def _response_end(ids: list[int], start: int, eos_id: int | None) -> int:
    """End of the response that starts at ids[start]: after its last EOS, or the end when it has none."""
    eos_at = [i for i in range(start, len(ids)) if ids[i] == eos_id]
    return eos_at[-1] + 1 if eos_at else len(ids)


def _response_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[int],
    conversation: list[dict[str, str]],
    where: str,
    what: str,
) -> list[int]:
    """The tokens `conversation` renders to after `prompt` (its render up to the response, with the
    generation prompt); InputError when `prompt` is not a prefix of it."""
    full = _render_ids(tokenizer, conversation, where)
    if full[: len(prompt)] != prompt:
        raise InputError(
            f"{where}: the chat template is not prefix-stable (the chat before {what}, with the generation "
            "prompt, does not render to a prefix of the chat with it), so the assistant tokens cannot be located"
        )
    response = full[len(prompt) : _response_end(full, len(prompt), tokenizer.eos_token_id)]
    if not response:
        raise InputError(f"{where}: {what} renders to no tokens")
    return response


def _fit_length(n_tokens: int, where: str, max_len: int, truncation: Truncation) -> None:
    if truncation not in ("off", "right"):
        raise InputError(f"truncation must be 'off' or 'right', got {truncation!r}")
    if n_tokens > max_len and truncation == "off":
        raise InputError(f"{where}: {n_tokens} tokens, more than max_len={max_len} (truncation is off)")


# -------------------------------------------------------------------------------------------------- SFT


@dataclass(frozen=True)
class SFTExample:
    """Token-aligned: loss_mask[i] = 1 when token i is a target (predicted from tokens < i)."""

    input_ids: list[int]
    loss_mask: list[int]


def build_sft_examples(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    truncation: Truncation = "off",
    fields: RecordFields | None = None,
) -> list[SFTExample]:
    """One example per row: a chat (`messages`) or a prompt + completion (`prompt` + `completion`/`response`).

    The layout is detected per row, or forced by `fields` (RecordFields(messages=...) or
    RecordFields(prompt=..., response=...)). Targets: every assistant turn of a chat with its end of turn;
    the completion + EOS of a prompt/completion row. Length policy in the module docstring.
    """
    if fields is not None and (fields.text is not None or (fields.prompt and not fields.response)):
        raise InputError(f"sft: record fields must be messages or prompt + response, got {fields}")
    examples = []
    for record, where in rows:
        layout = _sft_layout(record, where, fields)
        if layout.messages is not None:
            ids, mask = _chat_tokens(tokenizer, record[layout.messages], where)
        else:
            if not record[layout.response].strip():
                raise InputError(f"{where}: field '{layout.response}' is empty, so nothing to train on")
            ids, mask = _completion_tokens(tokenizer, record[layout.prompt], record[layout.response], where)
        examples.append(_truncated_example(ids, mask, where, max_len, truncation))
    return examples


def _sft_layout(record: dict[str, Any], where: str, fields: RecordFields | None) -> RecordFields:
    if fields is None:
        completion = next((k for k in COMPLETION_KEYS if _present(record, k)), None)
        if _present(record, "messages"):
            fields = CHAT_FIELDS
        elif _present(record, "prompt") and completion is not None:
            fields = RecordFields(prompt="prompt", response=completion)
        else:
            raise InputError(
                f"{where}: expected field 'messages', or 'prompt' with 'completion' or 'response'; "
                f"got fields {sorted(record)}"
            )
    problem = check_record(record, fields)
    if problem is not None:
        raise InputError(f"{where}: {problem}")
    return fields


def _chat_tokens(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str
) -> tuple[list[int], list[int]]:
    """The whole (validated) chat's tokens, with loss on each assistant turn k: the tokens messages[:k+1]
    adds to the render of messages[:k] with its generation prompt."""
    _require_chat_template(tokenizer, where)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise InputError(f"{where}: the chat has no assistant turn, so nothing to train on")
    if turns[0] == 0:
        raise InputError(
            f"{where}: the chat starts with an assistant turn; it needs a user or system turn first"
        )
    ids = _render_ids(tokenizer, messages, where)
    mask = [0] * len(ids)
    for k in turns:
        prompt = _render_ids(tokenizer, messages[:k], where, add_generation_prompt=True)
        response = _response_ids(tokenizer, prompt, messages[: k + 1], where, f"assistant message {k}")
        end = len(prompt) + len(response)
        if ids[len(prompt) : end] != response:
            raise InputError(
                f"{where}: the chat template is not prefix-stable (messages[:{k + 1}] does not render to a "
                "prefix of the whole chat), so the assistant tokens cannot be located"
            )
        mask[len(prompt) : end] = [1] * len(response)
    return ids, mask


def _completion_tokens(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, where: str
) -> tuple[list[int], list[int]]:
    """BOS + prompt (no loss) + completion + EOS (loss); prompt and completion are encoded separately."""
    prompt_ids = _with_bos(tokenizer, _encode(tokenizer, prompt))
    completion_ids = _encode(tokenizer, completion) + [_eos_id(tokenizer, where)]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def _truncated_example(
    ids: list[int], mask: list[int], where: str, max_len: int, truncation: Truncation
) -> SFTExample:
    _fit_length(len(ids), where, max_len, truncation)
    ids, mask = ids[:max_len], [0, *mask[1:max_len]]  # token 0 has no context: never a target
    if not any(mask):
        raise InputError(
            f"{where}: no target token within the first max_len={max_len} tokens (the prompt fills them)"
        )
    return SFTExample(ids, mask)


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each item (in the given order) put into the first bin with room for it.

    O(n log n): a max-tree over the bins' free room (n bins, all empty at first, so the first empty bin
    is where a new one opens). Every length must be <= capacity.
    """
    size = 1 << max(len(lengths) - 1, 0).bit_length()  # leaves: bins 0 .. size - 1
    room = [capacity] * (2 * size)  # room[1] is the root; node i has children 2i, 2i + 1
    bins: list[list[int]] = []
    for item, length in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= length else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        room[node] -= length
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return bins


class SFTDataset:
    """SFT examples as pretraining Samples of `seq_len` inputs (core/data/pretrain_dataset.py's format).

    An example of L tokens takes L - 1 positions: inputs are its tokens but the last, labels its tokens
    but the first, and loss_mask[t] = example.loss_mask[t + 1] (the target predicted at position t).
    position_ids restart at 0 and segment_ids count up per example; padding (labels `pad_id`, loss 0) is
    one extra segment. Examples are never split across samples.

    Packing (`packing=True`): greedy first-fit of the examples, taken in an order seeded by `seed`, into
    bins of seq_len positions. The bins are computed once, so the number of samples is the same every epoch
    (PretrainBatches needs a fixed epoch size to resume); each epoch visits them in an order seeded by
    (seed, epoch). `packing=False`: one example per sample, right-padded.
    Sample i is sample i % len of epoch i // len; any i >= 0 is valid.
    """

    def __init__(
        self,
        examples: Sequence[SFTExample],
        seq_len: int,
        seed: int,
        pad_id: int = 0,
        packing: bool = True,
    ) -> None:
        if not examples:
            raise InputError("sft dataset: no examples")
        positions = [len(e.input_ids) - 1 for e in examples]  # (n,)
        longest = int(np.argmax(positions))
        if positions[longest] > seq_len:
            raise InputError(
                f"sft dataset: example {longest} has {positions[longest] + 1} tokens; a sample of "
                f"seq_len={seq_len} holds examples of up to seq_len + 1 = {seq_len + 1}"
            )
        self.seq_len, self.seed, self.pad_id = seq_len, seed, pad_id
        self._offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum([len(e.input_ids) for e in examples], out=self._offsets[1:])
        self._tokens = np.array([t for e in examples for t in e.input_ids], dtype=np.int64)
        self._loss_mask = np.array([m for e in examples for m in e.loss_mask], dtype=np.float32)
        if packing:
            order = np.random.default_rng(seed).permutation(len(examples)).tolist()
            bins = first_fit([positions[j] for j in order], seq_len)
            self.bins = [[order[i] for i in b] for b in bins]
        else:
            self.bins = [[j] for j in range(len(examples))]
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.bins)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.bins))

    def examples_at(self, index: int) -> list[int]:
        """Indices of the examples in sample `index`, in segment order."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, k = divmod(index, len(self.bins))
        order = _cached(self._orders, epoch, self._epoch_order)
        return self.bins[int(order[k])]

    def __getitem__(self, index: int) -> Sample:
        return self._assemble(self.examples_at(index))

    def _assemble(self, examples: list[int]) -> Sample:
        S = self.seq_len
        input_ids = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(S, dtype=np.float32)
        positions = np.empty(S, dtype=np.int64)
        segments = np.full(S, len(examples), dtype=np.int64)  # padding is the last segment
        end = 0
        for segment, j in enumerate(examples):
            lo, hi = self._offsets[j], self._offsets[j + 1]
            n = int(hi - lo) - 1
            input_ids[end : end + n] = self._tokens[lo : hi - 1]
            labels[end : end + n] = self._tokens[lo + 1 : hi]
            loss_mask[end : end + n] = self._loss_mask[lo + 1 : hi]
            positions[end : end + n] = np.arange(n)
            segments[end : end + n] = segment
            end += n
        positions[end:] = np.arange(S - end)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": positions,
            "segment_ids": segments,
        }


# ---------------------------------------------------------------------------------------------- preference


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt and two responses to it; each response is its tokens including the final EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def build_preference_examples(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    truncation: Truncation = "off",
) -> list[PreferenceExample]:
    """One example per row {"prompt", "chosen", "rejected"}, as TRL's preference formats:

    - strings: BOS + prompt; chosen / rejected + EOS.
    - chat, explicit prompt: "prompt" a list of messages, "chosen" / "rejected" the messages answering it.
    - chat, implicit prompt: no "prompt"; "chosen" / "rejected" whole conversations that differ only in
      their last (assistant) message.
    A chat prompt is rendered with the generation prompt. max_len bounds prompt + the longer response;
    truncation "right" cuts the responses (module docstring).
    """
    examples = []
    for record, where in rows:
        for key in ("chosen", "rejected"):
            if not _present(record, key):
                raise InputError(f"{where}: missing field '{key}'")
        chosen, rejected = record["chosen"], record["rejected"]
        if isinstance(chosen, str) and isinstance(rejected, str):
            example = _text_preference(tokenizer, record.get("prompt"), chosen, rejected, where)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            example = _chat_preference(tokenizer, record.get("prompt"), chosen, rejected, where)
        else:
            raise InputError(
                f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages"
            )
        if example.chosen_ids == example.rejected_ids:
            raise InputError(f"{where}: chosen and rejected are identical")
        examples.append(_truncated_preference(example, where, max_len, truncation))
    return examples


def _text_preference(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, chosen: str, rejected: str, where: str
) -> PreferenceExample:
    if not isinstance(prompt, str):
        raise InputError(f"{where}: field 'prompt' must be a string when 'chosen' and 'rejected' are strings")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise InputError(f"{where}: field '{key}' is empty")
    eos = _eos_id(tokenizer, where)
    prompt_ids = _with_bos(tokenizer, _encode(tokenizer, prompt))
    if not prompt_ids:
        raise InputError(f"{where}: the prompt is empty (the first response token needs context)")
    return PreferenceExample(
        prompt_ids, _encode(tokenizer, chosen) + [eos], _encode(tokenizer, rejected) + [eos]
    )


def _chat_preference(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, chosen: list, rejected: list, where: str
) -> PreferenceExample:
    _require_chat_template(tokenizer, where)
    chosen = validate_messages(chosen, where=f"{where}: field 'chosen'")
    rejected = validate_messages(rejected, where=f"{where}: field 'rejected'")
    if prompt is None:  # implicit prompt: the shared conversation before the last message
        if chosen[:-1] != rejected[:-1]:
            raise InputError(
                f"{where}: without a 'prompt', 'chosen' and 'rejected' must differ only in their last message"
            )
        if len(chosen) < 2:
            raise InputError(
                f"{where}: without a 'prompt', 'chosen' needs the prompt messages before its answer"
            )
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    prompt = validate_messages(prompt, where=f"{where}: field 'prompt'")
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if response[-1]["role"] != "assistant":
            raise InputError(f"{where}: field '{key}' must end with an assistant message")
    prompt_ids = _render_ids(tokenizer, prompt, where, add_generation_prompt=True)
    return PreferenceExample(
        prompt_ids,
        _response_ids(tokenizer, prompt_ids, prompt + chosen, where, "the chosen response"),
        _response_ids(tokenizer, prompt_ids, prompt + rejected, where, "the rejected response"),
    )


def _truncated_preference(
    example: PreferenceExample, where: str, max_len: int, truncation: Truncation
) -> PreferenceExample:
    prompt_len = len(example.prompt_ids)
    _fit_length(
        prompt_len + max(len(example.chosen_ids), len(example.rejected_ids)), where, max_len, truncation
    )
    if prompt_len >= max_len:
        raise InputError(
            f"{where}: the prompt alone is {prompt_len} tokens, no room for a response within max_len={max_len}"
        )
    room = max_len - prompt_len
    chosen, rejected = example.chosen_ids[:room], example.rejected_ids[:room]
    if chosen == rejected:
        raise InputError(f"{where}: chosen and rejected are identical after truncation to max_len={max_len}")
    return PreferenceExample(example.prompt_ids, chosen, rejected)


def preference_batch(examples: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [chosen_0, rejected_0, chosen_1, ...], each prompt + response right-padded to the longest.

    The RL batch convention (algorithms/policy.py): input_ids (2B, T) long; response_mask (2B, T) float32,
    token-aligned: column t is 1 when token t belongs to the response (EOS included).
    """
    if not examples:
        raise InputError("preference batch: no examples")
    rows = [(e.prompt_ids, r) for e in examples for r in (e.chosen_ids, e.rejected_ids)]
    T = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    response_mask = torch.zeros(len(rows), T, dtype=torch.float32)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
        response_mask[i, len(prompt) : n] = 1.0
    return {"input_ids": input_ids, "response_mask": response_mask}
