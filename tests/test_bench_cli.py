"""`rl bench train`, `rl bench generate` and `rl bench refit` run end to end at the smallest sizes and print their rows.

Timings are not asserted (they belong to the benchmark's output, not to tests); what is asserted is
that every requested implementation got a row with numbers, and that each generation engine made
exactly batch * new_tokens tokens (EOS ignored), which is what makes their tokens/s comparable.
"""

from __future__ import annotations

import pytest

from rl.cli import main

BATCH, NEW_TOKENS = 2, 4


def rows(out: str) -> dict[str, list[str]]:
    """Table rows after the header line 'implementation ...', keyed by the name (up to two spaces)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("implementation"))
    return {line[:34].strip(): line[34:].split() for line in lines[start + 1 :] if line.strip()}


def test_bench_generate_prints_native_and_hf_rows(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "generate", "--preset", "llama_tiny", "--batch", str(BATCH)]
    argv += ["--prompt-len", "8", "--new-tokens", str(NEW_TOKENS), "--engines", "native,hf"]
    assert main(argv) == 0
    table = rows(capsys.readouterr().out)
    assert set(table) == {"hf generate", "tandem native engine"}
    for name, cells in table.items():
        assert "skipped" not in cells, f"{name}: {cells}"
        assert int(cells[2].replace(",", "")) == BATCH * NEW_TOKENS, f"{name}: {cells}"
    assert table["hf generate"][3] == "1.00x"


def test_bench_refit_prints_baseline_refit_and_use_model_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "refit", "--preset", "llama_tiny", "--repeats", "1"]) == 0
    table = rows(capsys.readouterr().out)
    assert set(table) == {"hf load_state_dict", "native refit_engine (256 MiB)", "native use_model (no copy)"}
    for name, cells in table.items():
        assert "skipped" not in cells, f"{name}: {cells}"
    # Both copying rows move the whole HF-named stream; use_model copies nothing.
    assert table["hf load_state_dict"][1] == table["native refit_engine (256 MiB)"][1] != "0.0000"
    assert table["native use_model (no copy)"][1] == "0.0000"


def test_bench_train_prints_model_engine_and_baseline_rows(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "train", "--preset", "llama_tiny", "--seq-len", "16", "--micro-batch-size", "2"]
    assert main([*argv, "--steps", "2", "--warmup", "1", "--engine"]) == 0
    table = rows(capsys.readouterr().out)
    assert set(table) == {"tandem GPTModel", "tandem ModelEngine", "transformers (baseline)"}
    for name, cells in table.items():
        assert float(cells[0].replace(",", "")) > 0, f"{name}: {cells}"  # tokens/s
    assert table["transformers (baseline)"][-1] == "1.00x"
