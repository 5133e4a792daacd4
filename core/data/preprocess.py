"""Tokenize record datasets into an indexed dataset (`prefix.bin` / `prefix.idx`), one document per record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.data.datasets import TEXT_FIELDS, RecordFields, iter_texts, load_records
from core.data.indexed import IndexedDatasetBuilder, best_fitting_dtype
from core.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenizeStats:
    documents: int
    tokens: int


def tokenize_to_indexed(
    inputs: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    output_prefix: str | Path,
    fields: RecordFields = TEXT_FIELDS,
    append_eos: bool = False,
    batch_size: int = 1000,
    progress: bool = True,
) -> TokenizeStats:
    """Every record of every input, in order, becomes one document of `output_prefix`.

    Plain text is encoded with the tokenizer's special tokens (e.g. a leading BOS); chat-templated text
    is encoded without them, since the template writes its own (as `apply_chat_template` does).
    """
    from tqdm import tqdm

    if append_eos and tokenizer.eos_token_id is None:
        raise InputError(f"{output_prefix}: --append-eos needs a tokenizer with an eos_token")
    datasets = [(Path(path), load_records(path, fields)) for path in inputs]
    total = sum(len(ds) for _, ds in datasets)
    eos = [tokenizer.eos_token_id] if append_eos else []
    documents = tokens = 0
    with (
        IndexedDatasetBuilder(output_prefix, best_fitting_dtype(len(tokenizer))) as builder,
        tqdm(
            total=total, unit="doc", disable=not progress, desc=f"tokenize {Path(output_prefix).name}"
        ) as bar,
    ):
        for path, dataset in datasets:
            for texts in iter_texts(dataset, fields, path, tokenizer, batch_size):
                encoded = tokenizer(texts, add_special_tokens=fields.messages is None)["input_ids"]
                for ids in encoded:
                    builder.add_document(ids + eos)
                    tokens += len(ids) + len(eos)
                documents += len(texts)
                bar.update(len(texts))
    return TokenizeStats(documents=documents, tokens=tokens)
