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


def assert_ratios_to(table: dict[str, list[str]], baseline: str, tokens_col: int, ratio_col: int) -> None:
    """Each row's 'vs base' is its tokens/s over the baseline's, as printed: tokens/s are rounded to whole
    tokens and the ratio to 0.01, so the printed ratio lies within what those roundings allow."""
    base = float(table[baseline][tokens_col].replace(",", ""))
    for name, cells in table.items():
        ours, ratio = float(cells[tokens_col].replace(",", "")), float(cells[ratio_col].removesuffix("x"))
        low, high = (ours - 0.5) / (base + 0.5), (ours + 0.5) / (base - 0.5)
        assert low - 0.005 <= ratio <= high + 0.005, f"{name}: {cells} against {baseline}: {table[baseline]}"


def test_bench_generate_prints_native_and_hf_rows(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "generate", "--preset", "llama_tiny", "--batch", str(BATCH)]
    argv += ["--prompt-len", "8", "--new-tokens", str(NEW_TOKENS), "--engines", "native,hf"]
    assert main(argv) == 0
    table = rows(capsys.readouterr().out)
    assert set(table) == {"hf generate", "tandem native engine"}
    for name, cells in table.items():
        assert "skipped" not in cells, f"{name}: {cells}"
        assert int(cells[2].replace(",", "")) == BATCH * NEW_TOKENS, f"{name}: {cells}"
    assert_ratios_to(table, "hf generate", tokens_col=0, ratio_col=3)


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
    assert_ratios_to(table, "transformers (baseline)", tokens_col=0, ratio_col=-1)


@pytest.mark.slow
def test_bench_grpo_times_full_steps_and_their_phases(capsys: pytest.CaptureFixture[str]) -> None:
    """One timed GRPO step of the real loop (native engine, reference, train); its phases lie inside the
    step. The TRL row has numbers where trl is installed, else says why not."""
    argv = ["bench", "grpo", "--preset", "llama_tiny", "--prompts", "2", "--n", "2", "--prompt-len", "4"]
    argv += ["--new-tokens", "4", "--steps", "1", "--warmup", "1", "--micro-batch-size", "4"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("implementation"))
    table = {line[:30].strip(): line[30:].split() for line in lines[start + 1 :] if line.strip()}
    ours = table["tandem GRPO (native engine)"]
    step, phases = float(ours[0]), [float(x) for x in ours[2:]]
    assert step > 0 and len(phases) == 6 and all(p >= 0 for p in phases)
    assert phases[1] > 0 and phases[5] > 0  # generate and train ran
    assert sum(phases) <= step * 1.01, (step, phases)
    trl = table["TRL GRPOTrainer (baseline)"]
    try:
        import trl as _  # noqa: F401
    except ImportError:
        assert "not importable" in " ".join(trl), trl
    else:
        assert float(trl[0]) > 0 and ours[1].endswith("x"), (ours, trl)


@pytest.mark.parametrize("row", ["ours", "engine", "hf"])
def test_bench_train_grad_accum_averages_micro_batches_into_one_step(row: str, monkeypatch) -> None:
    """--grad-accum N: N micro-batches, then one optimizer step on their mean gradient. With the same
    micro-batch repeated, the gradient the optimizer sees equals one micro-batch's (a missing 1/N would
    make it N times larger), and the optimizer steps once. The engine clips before its step, so its
    reported pre-clip gradient norm is compared instead."""
    import torch

    from core.models import preset
    from rl.bench.train import engine_step_fn, hf_step_fn, ours_step_fn

    builder = {"ours": ours_step_fn, "engine": engine_step_fn, "hf": hf_step_fn}[row]
    config = preset("llama_tiny")
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = (ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), None)
    seen: list[list[torch.Tensor]] = []
    adamw_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)

    def grads_of_one_step(accum: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        seen.clear()
        step, _ = builder(config, batch, torch.device("cpu"), torch.float32, False, "none", accum)
        result = step()
        assert len(seen) == 1 and seen[0]
        if row == "engine":
            return [torch.tensor(result.grad_norm)]
        return seen[0]

    for one, three in zip(grads_of_one_step(1), grads_of_one_step(3), strict=True):
        torch.testing.assert_close(three, one, atol=1e-6, rtol=1e-4)
