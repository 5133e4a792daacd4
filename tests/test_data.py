"""Data pipeline: indexed files, packing with document boundaries, blending, resumable batches, loaders, CLI."""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data.datasets import RecordFields, load_records, record_text
from core.data.indexed import IndexedDataset, IndexedDatasetBuilder
from core.data.pretrain_dataset import (
    BlendedDataset,
    PackedDataset,
    PretrainBatches,
    build_pretrain_dataset,
    parse_data_paths,
)
from core.data.synthetic import generate_arithmetic, score_arithmetic, write_arithmetic_corpus
from core.data.tokenizer import DEFAULT_CHAT_TEMPLATE, apply_chat_template, load_tokenizer
from core.errors import InputError
from rl.commands import data as data_command

EOS = 1


def write_indexed(prefix: Path, documents: list[list[int]], dtype: type = np.int32) -> IndexedDataset:
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in documents:
            builder.add_document(doc)
    return IndexedDataset(prefix)


def unique_documents(n_docs: int, seed: int = 0, first_token: int = 10) -> list[list[int]]:
    """Documents whose tokens are all distinct (so a token tells which document and offset it came from)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=n_docs)
    starts = first_token + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [list(range(s, s + n)) for s, n in zip(starts.tolist(), lengths.tolist())]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return write_arithmetic_corpus(tmp_path_factory.mktemp("arith"), n_train=300, n_eval=50, seed=3)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="rl")
    data_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", *map(str, argv)])
    return args.func(args)


# ---------------------------------------------------------------------------------------- indexed files


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_indexed_round_trip(tmp_path: Path, dtype: type) -> None:
    documents = [[5, 6, 7], [], [9], list(range(100, 1100))]
    dataset = write_indexed(tmp_path / "corpus", documents, dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin", "corpus.idx"]  # no temp files left
    assert len(dataset) == 4 and dataset.dtype == np.dtype(dtype)
    assert dataset.sizes.tolist() == [3, 0, 1, 1000] and dataset.num_tokens == 1004
    for i, doc in enumerate(documents):
        assert dataset[i].tolist() == doc
    assert dataset[-1][-1] == 1099
    assert dataset.get(3, offset=10, length=5).tolist() == [110, 111, 112, 113, 114]
    with pytest.raises(IndexError):
        dataset[4]


def test_indexed_failed_build_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(tmp_path / "corpus", np.uint16) as builder:
        builder.add_document([1, 2])
        raise RuntimeError("crash mid-build")
    assert list(tmp_path.iterdir()) == []


def test_indexed_corrupt_files_are_named(tmp_path: Path) -> None:
    write_indexed(tmp_path / "c", [[1, 2, 3], [4, 5]])
    idx = tmp_path / "c.idx"
    good = idx.read_bytes()
    idx.write_bytes(good[:-3])
    with pytest.raises(InputError, match=f"{idx}: corrupt index"):
        IndexedDataset(tmp_path / "c")
    idx.write_bytes(good[:10])
    with pytest.raises(InputError, match=f"{idx}: truncated index"):
        IndexedDataset(tmp_path / "c")
    idx.write_bytes(b"NOTANIDX!" + good[9:])
    with pytest.raises(InputError, match="bad magic"):
        IndexedDataset(tmp_path / "c")
    idx.write_bytes(good)
    (tmp_path / "c.bin").write_bytes(b"\0" * 8)
    with pytest.raises(InputError, match=f"{tmp_path / 'c.bin'}: truncated data file"):
        IndexedDataset(tmp_path / "c")
    with pytest.raises(InputError, match="missing.idx: indexed dataset file not found"):
        IndexedDataset(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- packing


def check_epoch(dataset: PackedDataset, documents: list[list[int]], epoch: int) -> None:
    """Every sample keeps boundaries, and the epoch covers every token exactly once."""
    where = {tok: (d, off) for d, doc in enumerate(documents) for off, tok in enumerate(doc)}
    inputs, labels = [], []
    for k in range(len(dataset)):
        sample = dataset[epoch * len(dataset) + k]
        ids, seg, pos, mask = (
            sample[key] for key in ("input_ids", "segment_ids", "position_ids", "loss_mask")
        )
        assert all(len(v) == dataset.seq_len for v in sample.values())
        assert (sample["labels"][:-1] == ids[1:]).all()
        n_inputs = int(mask.sum()) + 1 if mask[-1] == 0 else dataset.seq_len  # real inputs in this sample
        for t in range(1, n_inputs):
            new_doc = ids[t - 1] == EOS
            assert (seg[t] != seg[t - 1]) == new_doc
            assert pos[t] == (0 if new_doc else pos[t - 1] + 1)
            if not new_doc and ids[t] != EOS:  # consecutive tokens of the same document
                assert where[int(ids[t])] == (where[int(ids[t - 1])][0], where[int(ids[t - 1])][1] + 1)
        assert pos[0] == 0 and seg[0] == 0
        assert (seg[n_inputs:] == seg[n_inputs - 1] + 1).all()  # padding is its own segment
        inputs += ids[mask == 1].tolist()
        labels += sample["labels"][mask == 1].tolist()
    stream = Counter(tok for doc in documents for tok in [*doc, EOS])
    assert len(inputs) == len(labels) == stream.total() - 1
    assert Counter(labels) + Counter([dataset[epoch * len(dataset)]["input_ids"][0].item()]) == stream


def test_packing_keeps_document_boundaries(tmp_path: Path) -> None:
    documents = unique_documents(40)
    dataset = PackedDataset(write_indexed(tmp_path / "c", documents), seq_len=16, seed=0, eos_id=EOS)
    assert dataset.num_tokens == sum(len(d) + 1 for d in documents)
    check_epoch(dataset, documents, epoch=0)
    check_epoch(dataset, documents, epoch=1)
    first = [dataset[k]["input_ids"].tolist() for k in range(len(dataset))]
    second = [dataset[len(dataset) + k]["input_ids"].tolist() for k in range(len(dataset))]
    assert first != second  # documents reshuffled for the next epoch


def test_packing_uses_existing_eos_and_pads_last_sample(tmp_path: Path) -> None:
    documents = [[2, 3, EOS], [4, 5, 6, EOS]]  # tokenized with --append-eos: nothing is added
    dataset = PackedDataset(write_indexed(tmp_path / "c", documents), seq_len=4, seed=0, eos_id=EOS, pad_id=0)
    assert dataset.num_tokens == 7 and len(dataset) == 2
    last = dataset[1]
    assert last["loss_mask"].tolist() == [1, 1, 0, 0]
    assert last["labels"][2:].tolist() == [0, 0]


# -------------------------------------------------------------------------------------- order, blending


def batches_as_lists(batches: PretrainBatches, n: int) -> list[list[list[int]]]:
    return [next(batches)["input_ids"].tolist() for _ in range(n)]


def test_sample_order_is_deterministic_per_seed(tmp_path: Path) -> None:
    write_indexed(tmp_path / "c", unique_documents(60))

    def order(seed: int) -> list[list[list[int]]]:
        dataset = build_pretrain_dataset([(tmp_path / "c", 1.0)], seq_len=8, seed=seed, eos_id=EOS)
        return batches_as_lists(PretrainBatches(dataset, batch_size=4, seed=seed), 6)

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_batch_shapes_and_dtypes(tmp_path: Path) -> None:
    write_indexed(tmp_path / "c", unique_documents(20))
    dataset = build_pretrain_dataset([(tmp_path / "c", 1.0)], seq_len=8, seed=0, eos_id=EOS)
    batch = next(PretrainBatches(dataset, batch_size=3, seed=0))
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "input_ids": ((3, 8), torch.int64),
        "labels": ((3, 8), torch.int64),
        "loss_mask": ((3, 8), torch.float32),
        "position_ids": ((3, 8), torch.int64),
        "segment_ids": ((3, 8), torch.int64),
    }


def test_blend_achieves_weights(tmp_path: Path) -> None:
    small = PackedDataset(write_indexed(tmp_path / "a", unique_documents(10, 1)), 8, seed=0, eos_id=EOS)
    large = PackedDataset(write_indexed(tmp_path / "b", unique_documents(50, 2, 1000)), 8, seed=0, eos_id=EOS)
    blend = BlendedDataset([small, large], [0.3, 0.7])
    n = 1000
    counts = Counter(blend.source(i)[0] for i in range(n))
    assert abs(counts[0] - 0.3 * n) <= 1 and abs(counts[1] - 0.7 * n) <= 1
    for i in (0, 1, 2, 500):  # components are read in order, across their epochs
        d, k = blend.source(i)
        assert blend[i]["input_ids"].tolist() == [small, large][d][k]["input_ids"].tolist()
    assert parse_data_paths(["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")]) == [
        (str(tmp_path / "a"), 0.3),
        (str(tmp_path / "b"), 0.7),
    ]
    copy = pickle.loads(pickle.dumps(blend))  # e.g. sent to a DataLoader or Ray worker
    assert copy[500]["input_ids"].tolist() == blend[500]["input_ids"].tolist()
    with pytest.raises(InputError, match="weights must be positive"):
        BlendedDataset([small, large], [1.0, 0.0])


def test_resume_gives_identical_next_batches(tmp_path: Path) -> None:
    write_indexed(tmp_path / "a", unique_documents(15, 1))
    write_indexed(tmp_path / "b", unique_documents(15, 2, 1000))
    dataset = build_pretrain_dataset([(tmp_path / "a", 1.0), (tmp_path / "b", 2.0)], 8, seed=5, eos_id=EOS)
    reference = PretrainBatches(dataset, batch_size=5, seed=5)
    batches_as_lists(reference, 3)
    state = json.loads(json.dumps(reference.state_dict()))  # survives a checkpoint round trip
    expected = batches_as_lists(reference, 8)  # crosses the epoch boundary (len(dataset) < 55)
    assert len(dataset) < 55
    resumed = PretrainBatches(
        build_pretrain_dataset([(tmp_path / "a", 1.0), (tmp_path / "b", 2.0)], 8, 5, EOS), 5, 5
    )
    resumed.load_state_dict(state)
    assert batches_as_lists(resumed, 8) == expected
    restarted = PretrainBatches(dataset, batch_size=5, seed=5, start_sample=state["consumed_samples"])
    assert batches_as_lists(restarted, 8) == expected


def test_data_parallel_ranks_split_the_global_batch(tmp_path: Path) -> None:
    write_indexed(tmp_path / "c", unique_documents(30))
    dataset = build_pretrain_dataset([(tmp_path / "c", 1.0)], seq_len=8, seed=0, eos_id=EOS)
    full = next(PretrainBatches(dataset, batch_size=4, seed=0))["input_ids"]
    ranks = [
        next(PretrainBatches(dataset, batch_size=2, seed=0, dp_rank=r, dp_size=2))["input_ids"]
        for r in (0, 1)
    ]
    assert torch.equal(torch.cat(ranks), full)


# ---------------------------------------------------------------------------------- loaders, tokenizers


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "a"', "invalid JSON"),
        ('{"body": "a"}', "missing field 'text'"),
        ('{"text": 3}', "field 'text' must be a string, got int"),
        ('["text"]', "expected a JSON object"),
    ],
)
def test_malformed_jsonl_row_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n\n' + line + "\n")
    with pytest.raises(InputError, match=f"^{path}:3: {message}"):
        load_records(path, RecordFields(text="text"))


def test_bad_chat_row_is_named(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(
        InputError, match=f"^{path}:1: field 'messages'\\[0\\]: field 'content' must be a string"
    ):
        load_records(path, RecordFields(messages="messages"))


def test_loads_parquet_and_saved_datasets(tmp_path: Path, corpus) -> None:
    import datasets

    rows = {"prompt": ["1+1=", "2+2="], "response": ["2", "4"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    fields = RecordFields(prompt="prompt", response="response")
    for source in (tmp_path / "rows.parquet", tmp_path / "saved"):
        loaded = load_records(source, fields)
        assert [record_text(r, fields) for r in loaded] == ["1+1=2", "2+2=4"]
    with pytest.raises(InputError, match=f"{tmp_path / 'rows.parquet'}: missing field 'text'"):
        load_records(tmp_path / "rows.parquet", RecordFields(text="text"))
    with pytest.raises(InputError, match="no split 'test'"):
        load_records(tmp_path / "saved", fields, split="test")


def test_missing_tokenizer_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"{tmp_path / 'nope'}: tokenizer path not found"):
        load_tokenizer(tmp_path / "nope")


def test_broken_tokenizer_config_is_named(tmp_path: Path, corpus) -> None:
    broken = tmp_path / "tok"
    shutil.copytree(corpus.tokenizer, broken)
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": ')
    with pytest.raises(InputError, match=f"^{broken / 'tokenizer_config.json'}:1: invalid JSON"):
        load_tokenizer(broken)


def test_arithmetic_tokenizer_loads_with_auto_tokenizer(corpus) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(corpus.tokenizer))
    assert {p.name for p in corpus.tokenizer.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert len(tokenizer) % 8 == 0
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<bos>", "<eos>")
    ids = tokenizer("12+34=46")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 9  # <bos> + one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12+34=46"
    assert tokenizer.decode(tokenizer("7-8=-1")["input_ids"][1:]) == "7-8=-1"
    assert load_tokenizer(corpus.tokenizer)("12+34=46")["input_ids"] == ids  # the fast path agrees


def test_chat_template_falls_back_to_default(corpus) -> None:
    tokenizer = load_tokenizer(corpus.tokenizer)
    tokenizer.chat_template = None  # the arithmetic tokenizer ships one; test the fallback without it
    messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    text = apply_chat_template(tokenizer, messages[:1], add_generation_prompt=True)
    assert text == "<|user|>\n1+1=<eos>\n<|assistant|>\n"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }};{% endfor %}"
    assert apply_chat_template(tokenizer, messages) == "1+1=;2;"
    assert "eos_token" in DEFAULT_CHAT_TEMPLATE


def test_arithmetic_splits_are_disjoint_and_scored(corpus) -> None:
    train, held_out = generate_arithmetic(2000, 500, seed=0, digits=2, ops="+-")
    assert len({p.prompt for p in train}) == 2000 and not {p.prompt for p in train} & {
        p.prompt for p in held_out
    }
    assert generate_arithmetic(2000, 500, seed=0, digits=2, ops="+-") == (train, held_out)
    assert all(score_arithmetic(p.prompt, p.answer + "<eos>") for p in train + held_out)
    assert not score_arithmetic("12+34=", "47") and not score_arithmetic("12+34=", "461")
    assert not score_arithmetic("12+34=", "") and score_arithmetic("9-12=", " -3\n")
    rows = [json.loads(line) for line in corpus.eval.read_text().splitlines()]
    assert len(rows) == 50 and all(r["text"] == r["prompt"] + r["answer"] for r in rows)
    with pytest.raises(InputError, match="only 20000 distinct"):
        generate_arithmetic(20000, 1, seed=0, digits=2, ops="+-")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_tokenize_end_to_end(tmp_path: Path, corpus, capsys: pytest.CaptureFixture) -> None:
    prefix = tmp_path / "out" / "eval"
    rc = run_cli("tokenize", "--input", corpus.eval, "--tokenizer", corpus.tokenizer, "--output-prefix", prefix,
                 "--append-eos")  # fmt: skip
    assert rc == 0
    tokenizer = load_tokenizer(corpus.tokenizer)
    texts = [json.loads(line)["text"] for line in corpus.eval.read_text().splitlines()]
    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(texts)
    for i in (0, len(texts) - 1):
        assert dataset[i].tolist() == tokenizer(texts[i])["input_ids"] + [tokenizer.eos_token_id]
    assert run_cli("inspect", prefix, "--tokenizer", corpus.tokenizer) == 0
    out = capsys.readouterr().out
    assert f"documents: {len(texts)}" in out and repr(f"<bos>{texts[0]}<eos>") in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1+1=2"}\n{"txt": "2+2=4"}\n')
    assert (
        run_cli("tokenize", "--input", bad, "--tokenizer", corpus.tokenizer, "--output-prefix", prefix) == 2
    )
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: missing field 'text'"
    assert IndexedDataset(prefix).sizes.tolist() == dataset.sizes.tolist()  # failed run kept the old output


def test_cli_synth_writes_trainable_corpus(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    assert run_cli("synth", "--output", out, "--n-train", "40", "--n-eval", "10", "--seed", "1") == 0
    assert sum(1 for _ in open(out / "train.jsonl")) == 40
    indexed = IndexedDataset(out / "train")
    dataset = build_pretrain_dataset(parse_data_paths([str(out / "train")]), seq_len=32, seed=0)
    assert dataset.num_tokens == indexed.num_tokens  # documents already end with EOS: nothing added
    batch = next(PretrainBatches(dataset, batch_size=2, seed=0))
    tokenizer = load_tokenizer(out / "tokenizer")
    later_starts = batch["input_ids"][(batch["position_ids"] == 0) & (batch["segment_ids"] > 0)]
    assert (batch["segment_ids"].amax(dim=1) > 0).all()  # documents are shorter than a sample
    assert set(later_starts.tolist()) <= {tokenizer.bos_token_id, tokenizer.pad_token_id}  # whole documents
    assert tokenizer.bos_token_id in later_starts.tolist()
