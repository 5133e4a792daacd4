"""Bad input to `rl sft`, `rl dpo` and `rl rm`: one line naming what is wrong (and the file:line of a bad
row), exit code 2, before any work, with nothing written to the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_llama import save_random_tiny_llama

from rl.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    from core.data.synthetic import save_char_tokenizer

    root = tmp_path_factory.mktemp("bad_input")
    tok = save_char_tokenizer(root / "tokenizer")
    plain = root / "plain_tokenizer"
    save_char_tokenizer(plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    return {"model": save_random_tiny_llama(root / "model", tokenizer_dir=tok), "plain": plain, "root": root}


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(capsys, command: str, run_dir: Path, model: Path, *overrides: str) -> str:
    code = main(
        [
            command,
            "-",
            f"run.dir={run_dir}",
            f"model.init_from={model}",
            "train.progress_bar=false",
            *overrides,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not run_dir.exists()
    return err[0]


@pytest.fixture(autouse=True)
def empty_config(tmp_path, monkeypatch):
    """`-` as CONFIG: an empty YAML in the test's directory (every value comes from overrides)."""
    (tmp_path / "-").write_text("{}\n")
    monkeypatch.chdir(tmp_path)


PAIR = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}
CHAT = {"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}


@pytest.mark.parametrize("command", ["dpo", "rm"])
def test_preference_rows(capsys, tmp_path, model, command):
    m = model["model"]
    missing = write(tmp_path / "missing.jsonl", [PAIR, {"prompt": "1+1=", "chosen": "2"}])
    err = run(capsys, command, tmp_path / "run", m, f"data.path={missing}")
    assert f"{missing}:2" in err and "rejected" in err, err
    same = write(tmp_path / "same.jsonl", [PAIR, {"prompt": "1+1=", "chosen": "2", "rejected": "2"}])
    err = run(capsys, command, tmp_path / "run", m, f"data.path={same}")
    assert f"{same}:2" in err and "identical" in err, err
    empty = write(tmp_path / "empty.jsonl", [])
    assert "no rows" in run(capsys, command, tmp_path / "run", m, f"data.path={empty}")
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(PAIR).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    assert f"{latin}:2" in run(capsys, command, tmp_path / "run", m, f"data.path={latin}")
    long = write(tmp_path / "long.jsonl", [{"prompt": "1+2=", "chosen": "3" * 40, "rejected": "4"}])
    err = run(capsys, command, tmp_path / "run", m, f"data.path={long}", "data.max_len=16")
    assert f"{long}:1" in err and "max_len=16" in err, err


def test_sft_rows(capsys, tmp_path, model):
    m = model["model"]
    no_assistant = write(tmp_path / "chat.jsonl", [CHAT, {"messages": [{"role": "user", "content": "1+2="}]}])
    err = run(capsys, "sft", tmp_path / "run", m, f"data.path={no_assistant}")
    assert f"{no_assistant}:2" in err and "assistant" in err, err
    err = run(
        capsys, "sft", tmp_path / "run", m, f"data.path={no_assistant}", f"model.tokenizer={model['plain']}"
    )
    assert "no chat template" in err, err
    long = write(tmp_path / "long.jsonl", [{"prompt": "1+2=", "completion": "3" * 80}])
    err = run(capsys, "sft", tmp_path / "run", m, f"data.path={long}", "data.seq_len=32")
    assert f"{long}:1" in err and "truncation" in err, err
    empty = write(tmp_path / "empty.jsonl", ["", ""])
    assert "no rows" in run(capsys, "sft", tmp_path / "run", m, f"data.path={empty}")


def test_lora_rank_and_architecture_mismatch(capsys, tmp_path, model):
    m, chat = model["model"], write(tmp_path / "chat.jsonl", [CHAT])
    err = run(capsys, "sft", tmp_path / "run", m, f"data.path={chat}", "lora.rank=0")
    assert "'lora.rank'" in err and "positive" in err, err
    err = run(capsys, "sft", tmp_path / "run", m, f"data.path={chat}", "model.hidden_size=96")
    assert "model.hidden_size=96" in err and "hidden_size=64" in err, err
    pairs = write(tmp_path / "pairs.jsonl", [PAIR])
    err = run(capsys, "dpo", tmp_path / "run", m, f"data.path={pairs}", "model.arch=qwen2")
    assert "model.arch=qwen2" in err, err
