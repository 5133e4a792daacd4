"""SFT / preference data: reading rows, assistant-only loss masks, length policy, packing parity with a model,
preference batches, and one-line errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import close

from core.data.alignment import (
    PreferenceExample,
    SFTDataset,
    SFTExample,
    build_preference_examples,
    build_sft_examples,
    first_fit,
    preference_batch,
    read_rows,
)
from core.data.datasets import RecordFields
from core.data.pretrain_dataset import PretrainBatches
from core.data.synthetic import save_char_tokenizer, write_sft_chat_data
from core.data.tokenizer import load_tokenizer
from core.errors import InputError
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel

# Chat template with a generation prompt (", ") and a newline after each assistant EOS: neither is a target.
HEADER_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}, {{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}, {% endif %}"
)
CHAT = [
    {"role": "user", "content": "1+2="},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "40+4="},
    {"role": "assistant", "content": "44"},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_char_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture
def tokenizer(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)  # fresh per test: tests set chat_template


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def targets(tokenizer, example: SFTExample) -> str:
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


def sft(tokenizer, records: list[dict], max_len: int = 64, truncation: str = "off") -> list[SFTExample]:
    return build_sft_examples(
        [(r, f"rows.jsonl:{i + 1}") for i, r in enumerate(records)], tokenizer, max_len, truncation
    )


# ------------------------------------------------------------------------------------------------ reading


def test_read_rows_from_jsonl_parquet_and_saved_dataset(tmp_path: Path) -> None:
    records = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    assert read_rows(path) == [(records[0], f"{path}:1"), (records[1], f"{path}:3")]
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "split"))
    for source in ("rows.parquet", "flat", "split"):
        path = tmp_path / source
        assert read_rows(path) == [(records[0], f"{path}: row 0"), (records[1], f"{path}: row 1")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "1+1="}\n{"prompt": "\xff"}\n', ":2: not valid UTF-8"),
        (b'{"prompt": "1+1="}\n\n{"prompt": \n', ":3: invalid JSON"),
        (b'["prompt"]\n', ":1: expected a JSON object per line, got list"),
        (b"\n  \n", ": no rows"),
    ],
)
def test_read_rows_errors_name_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"^{path}{message}"):
        read_rows(path)


def test_read_rows_missing_and_empty_table(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"^{tmp_path / 'nope.jsonl'}: dataset not found$"):
        read_rows(tmp_path / "nope.jsonl")
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(InputError, match=f"^{tmp_path / 'empty.parquet'}: no rows$"):
        read_rows(tmp_path / "empty.parquet")


# ------------------------------------------------------------------------------------------- SFT examples


def test_arithmetic_chat_tokenizes_as_its_pretraining_document(tokenizer) -> None:
    (single,) = sft(tokenizer, [{"messages": CHAT[:2]}])
    assert single.input_ids == tokenizer("1+2=3")["input_ids"] + [tokenizer.eos_token_id]
    assert targets(tokenizer, single) == "3<eos>"
    (multi,) = sft(tokenizer, [{"messages": CHAT}])
    assert tokenizer.decode(multi.input_ids) == "<bos>1+2=3<eos>40+4=44<eos>"
    assert targets(tokenizer, multi) == "3<eos>44<eos>"


def test_assistant_mask_skips_generation_prompt_and_text_after_eos(tokenizer) -> None:
    tokenizer.chat_template = HEADER_TEMPLATE
    (example,) = sft(tokenizer, [{"messages": [{"role": "system", "content": "0"}, *CHAT]}])
    assert tokenizer.decode(example.input_ids) == "<bos>01+2=, 3<eos>\n40+4=, 44<eos>\n"
    assert targets(tokenizer, example) == "3<eos>44<eos>"
    assert len(example.loss_mask) == len(example.input_ids)


def test_prompt_completion_mask(tokenizer) -> None:
    a, b = sft(tokenizer, [{"prompt": "12+34=", "completion": "46"}, {"prompt": "1-2=", "response": "-1"}])
    assert a.input_ids == tokenizer("12+34=46")["input_ids"] + [tokenizer.eos_token_id]
    assert a.loss_mask == [0] * 7 + [1] * 3  # <bos> 12+34= | 46 <eos>
    assert targets(tokenizer, b) == "-1<eos>"
    forced = build_sft_examples(
        [({"q": "1+1=", "a": "2"}, "x:1")], tokenizer, 64, fields=RecordFields(prompt="q", response="a")
    )
    assert targets(tokenizer, forced[0]) == "2<eos>"


def test_truncation_off_and_right(tokenizer) -> None:
    record = {"prompt": "12+34=", "completion": "46"}  # 10 tokens, targets at 7..9
    with pytest.raises(
        InputError, match=r"^rows.jsonl:1: 10 tokens, more than max_len=8 \(truncation is off\)$"
    ):
        sft(tokenizer, [record], max_len=8)
    (cut,) = sft(tokenizer, [record], max_len=8, truncation="right")
    assert cut.input_ids == tokenizer("12+34=4")["input_ids"] and cut.loss_mask == [0] * 7 + [1]
    with pytest.raises(InputError, match="^rows.jsonl:1: no target token within the first max_len=7 tokens"):
        sft(tokenizer, [record], max_len=7, truncation="right")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": []}, "field 'messages': expected a non-empty list of messages"),
        ({"messages": [{"role": "user"}]}, r"field 'messages'\[0\]: field 'content' must be a string"),
        ({"messages": CHAT[:1]}, "the chat has no assistant turn"),
        ({"messages": CHAT[1:2]}, "the chat starts with an assistant turn"),
        ({"prompt": "1+1="}, "expected field 'messages', or 'prompt' with 'completion' or 'response'"),
        ({"prompt": 3, "completion": "2"}, "field 'prompt' must be a string, got int"),
    ],
)
def test_bad_sft_rows_name_file_and_line(tmp_path: Path, tokenizer, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "1+1=", "completion": "2"}, record])
    with pytest.raises(InputError, match=f"^{path}:2: {message}"):
        build_sft_examples(read_rows(path), tokenizer, 64, "off")


def test_chat_needs_the_tokenizers_own_template(tmp_path: Path, tokenizer, tokenizer_dir: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": CHAT}])
    tokenizer.chat_template = None
    with pytest.raises(
        InputError,
        match=f"^{path}:1: rows have `messages` but the tokenizer at {tokenizer_dir} has no chat template$",
    ):
        build_sft_examples(read_rows(path), tokenizer, 64, "off")
    tokenizer.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match=f"^{path}:1: the chat template is not prefix-stable"):
        build_sft_examples(read_rows(path), tokenizer, 64, "off")


# ------------------------------------------------------------------------------------------------ packing


def test_first_fit_puts_each_item_in_the_first_bin_with_room() -> None:
    assert first_fit([5, 7, 3, 2, 6, 1], capacity=8) == [[0, 2], [1, 5], [3, 4]]
    assert first_fit([4], capacity=4) == [[0]]


def random_examples(n: int, seed: int, vocab: int = 64, longest: int = 12) -> list[SFTExample]:
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(2, longest + 1))
        mask = (rng.random(length) < 0.6).astype(int).tolist()
        mask[0], mask[-1] = 0, 1
        examples.append(SFTExample(rng.integers(4, vocab, length).tolist(), mask))
    return examples


def pieces(sample: dict[str, np.ndarray]) -> list[tuple[list[int], list[float]]]:
    """The (tokens, loss_mask[1:]) of each non-padding segment, reconstructed from a sample."""
    out = []
    for seg in np.unique(sample["segment_ids"]):
        at = sample["segment_ids"] == seg
        if sample["loss_mask"][at].any():
            assert (sample["position_ids"][at] == np.arange(at.sum())).all()
            tokens = sample["input_ids"][at].tolist() + sample["labels"][at][-1:].tolist()
            assert tokens[1:] == sample["labels"][at].tolist()
            out.append((tokens, sample["loss_mask"][at].tolist()))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_sft_dataset_holds_every_example_whole_once_per_epoch(packing: bool) -> None:
    examples = random_examples(40, seed=0)
    ds = SFTDataset(examples, seq_len=16, seed=1, pad_id=0, packing=packing)
    expected = sorted((e.input_ids, [float(m) for m in e.loss_mask[1:]]) for e in examples)
    for epoch in range(2):
        samples = [ds[epoch * len(ds) + k] for k in range(len(ds))]
        assert all(s[k].shape == (16,) for s in samples for k in s)
        assert sorted(p for s in samples for p in pieces(s)) == expected
    assert len(ds) < 40 if packing else len(ds) == 40
    assert [ds[i]["input_ids"].tolist() for i in range(len(ds))] != [
        ds[len(ds) + i]["input_ids"].tolist() for i in range(len(ds))
    ]  # reshuffled per epoch
    again = SFTDataset(examples, seq_len=16, seed=1, pad_id=0, packing=packing)
    assert all((again[i]["input_ids"] == ds[i]["input_ids"]).all() for i in range(3 * len(ds)))
    with pytest.raises(InputError, match="example .* has 12 tokens; a sample of seq_len=10"):
        SFTDataset([*examples, SFTExample([5] * 12, [0] + [1] * 11)], seq_len=10, seed=0)


def test_sft_dataset_batches_resume_exactly(tokenizer) -> None:
    examples = random_examples(30, seed=2)
    ds = SFTDataset(examples, seq_len=24, seed=0)
    run = PretrainBatches(ds, batch_size=4, seed=5)
    first = [next(run) for _ in range(3)]
    assert {k: (v.shape, v.dtype) for k, v in first[0].items()} == {
        "input_ids": ((4, 24), torch.int64),
        "labels": ((4, 24), torch.int64),
        "loss_mask": ((4, 24), torch.float32),
        "position_ids": ((4, 24), torch.int64),
        "segment_ids": ((4, 24), torch.int64),
    }
    state = run.state_dict()
    expected = [next(run) for _ in range(4)]  # crosses into the next epoch
    resumed = PretrainBatches(SFTDataset(examples, seq_len=24, seed=0), batch_size=4, seed=5)
    resumed.load_state_dict(state)
    for a, b in zip(expected, [next(resumed) for _ in range(4)]):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
def test_packed_rows_give_each_examples_own_losses(position_embedding: str) -> None:
    """Packed forward (segment_ids, position_ids) vs each example alone; fp32 on the CPU, reductions over
    at most 24 positions differ only by summation order (~1e-6). Learned position embeddings catch wrong
    position_ids, which RoPE (relative) would not; both catch attention across examples."""
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=2, ffn_hidden_size=64,
        max_position_embeddings=32, position_embedding=position_embedding, init_std=0.2,
    )  # fmt: skip
    model = GPTModel(config).eval()
    examples = random_examples(12, seed=3)
    ds = SFTDataset(examples, seq_len=24, seed=0)
    batch = {k: torch.from_numpy(np.stack([ds[i][k] for i in range(len(ds))])) for k in ds[0]}
    with torch.no_grad():
        logits = model(
            batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]
        )
        packed = (
            F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none") * batch["loss_mask"]
        )
        for i in range(len(ds)):
            for seg, j in enumerate(ds.examples_at(i)):
                ids = torch.tensor(examples[j].input_ids)
                alone = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="none")
                alone = alone * torch.tensor(examples[j].loss_mask[1:], dtype=torch.float32)
                at = batch["segment_ids"][i] == seg
                close(packed[i][at], alone, tol=1e-5)


# --------------------------------------------------------------------------------------------- preference


def test_preference_examples_from_strings_and_chats(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    user = {"role": "user", "content": "2+2="}
    rows = [
        ({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, "p:1"),
        ({"prompt": [user], "chosen": [{"role": "assistant", "content": "4"}],
          "rejected": [{"role": "assistant", "content": "5"}]}, "p:2"),
        ({"chosen": [user, {"role": "assistant", "content": "4"}],
          "rejected": [user, {"role": "assistant", "content": "5"}]}, "p:3"),
    ]  # fmt: skip
    four, five = (tokenizer(c, add_special_tokens=False)["input_ids"] for c in "45")
    expected = PreferenceExample(tokenizer("2+2=")["input_ids"], four + [eos], five + [eos])
    assert build_preference_examples(rows, tokenizer, max_len=16) == [expected] * 3
    tokenizer.chat_template = (
        HEADER_TEMPLATE  # the generation prompt is prompt; the "\n" after EOS is dropped
    )
    chat = build_preference_examples(rows[1:], tokenizer, max_len=16)
    assert [tokenizer.decode(e.prompt_ids + e.chosen_ids) for e in chat] == ["<bos>2+2=, 4<eos>"] * 2


def test_preference_truncation(tokenizer) -> None:
    row = [({"prompt": "1+1=", "chosen": "2222", "rejected": "2223"}, "p:1")]  # 5 + 5 tokens
    with pytest.raises(InputError, match=r"^p:1: 10 tokens, more than max_len=9 \(truncation is off\)$"):
        build_preference_examples(row, tokenizer, max_len=9)
    (cut,) = build_preference_examples(row, tokenizer, max_len=9, truncation="right")
    assert tokenizer.decode(cut.chosen_ids) == "2222" and tokenizer.decode(cut.rejected_ids) == "2223"
    with pytest.raises(
        InputError, match="^p:1: chosen and rejected are identical after truncation to max_len=8"
    ):
        build_preference_examples(row, tokenizer, max_len=8, truncation="right")
    with pytest.raises(InputError, match="^p:1: the prompt alone is 5 tokens"):
        build_preference_examples(row, tokenizer, max_len=5, truncation="right")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "1+1=", "chosen": "2"}, "missing field 'rejected'"),
        ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "chosen and rejected are identical$"),
        ({"prompt": "1+1=", "chosen": "2", "rejected": [{"role": "assistant", "content": "3"}]}, "'chosen' and 'rejected' must both be"),
        (
            {"chosen": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}],
             "rejected": [{"role": "user", "content": "9"}, {"role": "assistant", "content": "3"}]},
            "without a 'prompt', 'chosen' and 'rejected' must differ only in their last message",
        ),
        ({"prompt": "1+1=", "chosen": "2" * 20, "rejected": "3"}, "26 tokens, more than max_len=16"),
    ],
)  # fmt: skip
def test_bad_preference_rows_name_file_and_line(
    tmp_path: Path, tokenizer, record: dict, message: str
) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, record])
    with pytest.raises(InputError, match=f"^{path}:2: {message}"):
        build_preference_examples(read_rows(path), tokenizer, max_len=16)


def test_preference_batch_layout() -> None:
    examples = [PreferenceExample([1, 5], [6, 2], [7, 8, 2]), PreferenceExample([1], [9, 2], [3, 2])]
    batch = preference_batch(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 2, 0],  # chosen_0
        [1, 5, 7, 8, 2],  # rejected_0
        [1, 9, 2, 0, 0],  # chosen_1
        [1, 3, 2, 0, 0],  # rejected_1
    ]
    assert batch["response_mask"].tolist() == [
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0],
    ]
    assert batch["input_ids"].dtype == torch.long and batch["response_mask"].dtype == torch.float32


# ------------------------------------------------------------------------------------ synthetic chat data


def test_sft_chat_data_is_reproducible_disjoint_and_trainable(tmp_path: Path) -> None:
    corpus = write_sft_chat_data(tmp_path / "a", n_train=200, n_eval=40, seed=7, multi_turn_frac=0.3)
    again = write_sft_chat_data(tmp_path / "b", n_train=200, n_eval=40, seed=7, multi_turn_frac=0.3)
    assert (
        corpus.train.read_text() == again.train.read_text()
        and corpus.eval.read_text() == again.eval.read_text()
    )
    train, held_out = read_rows(corpus.train), read_rows(corpus.eval)
    assert (len(train), len(held_out)) == (200, 40)

    def problems(rows):
        return [m["content"] for r, _ in rows for m in r["messages"] if m["role"] == "user"]

    assert not set(problems(train)) & set(problems(held_out)) and len(set(problems(train))) == len(
        problems(train)
    )
    turns = [len(r["messages"]) // 2 for r, _ in train]
    assert 1 in turns and max(turns) > 1
    assert all(r["answer"] == r["messages"][-1]["content"] for r, _ in train)
    tokenizer = load_tokenizer(corpus.tokenizer)
    examples = build_sft_examples(train, tokenizer, max_len=64)
    for (record, _), example in zip(train, examples):
        answers = [m["content"] + "<eos>" for m in record["messages"] if m["role"] == "assistant"]
        assert targets(tokenizer, example) == "".join(answers)
    prompt = tokenizer.apply_chat_template(
        train[0][0]["messages"][:1], add_generation_prompt=True, tokenize=False
    )
    assert prompt == train[0][0]["messages"][0]["content"]
