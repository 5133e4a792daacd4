"""`rl generate` end to end in a subprocess (native engine) against HF generate, and its input errors.

Greedy token-for-token equality with HF is stable here: the tiny model's logits are peaked (init std
0.2), so top-1/top-2 gaps are far above fp32 noise (see test_native_engine). The vLLM path of the
command is not run here (vLLM import + build costs ~20-50 s); test_refit_layouts drives VLLMEngine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny_gen import build_tiny_llama

pytestmark = pytest.mark.slow  # every test runs `rl generate` in a subprocess

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 10


def rl_generate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "rl.cli", "generate", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


def hf_greedy(model_dir: Path, prompt: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS)
    return out[0, len(prompt) :].tolist()


def test_greedy_generate_matches_hf(model_dir: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            '{"prompt_token_ids": [1, 10, 11, 12]}',
            "",
            '{"prompt": "ab ac ad"}',
            '{"prompt_token_ids": [1, 40]}',
        ],
    )
    out = tmp_path / "out" / "samples.jsonl"
    proc = rl_generate(
        "--model", model_dir.parent, "--prompts", prompts, "--output", out,
        "--engine", "native", "--temperature", "0", "--max-tokens", MAX_TOKENS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[1]["prompt"] == "ab ac ad" and rows[1]["prompt_token_ids"] == [5, 6, 7]
    for row in rows:
        (sample,) = row["samples"]
        assert sample["token_ids"] == hf_greedy(model_dir, row["prompt_token_ids"])
        assert len(sample["logprobs"]) == len(sample["token_ids"])
        assert sample["finish_reason"] in ("stop", "length")
        assert sample["text"] and isinstance(sample["text"], str)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "ab"}', '{"prompt": "ab"'], "prompts.jsonl:2: not valid JSON"),
        (['{"prompt": "ab"}', "", '{"prompt": ""}'], 'prompts.jsonl:3: "prompt" must be a non-empty string'),
        (['{"text": "ab"}'], 'prompts.jsonl:1: expected an object with exactly one of "prompt"'),
        (['{"prompt_token_ids": []}'], 'prompts.jsonl:1: "prompt_token_ids" must be a non-empty list'),
    ],
)
def test_bad_prompts_exit_2_naming_file_and_line(model_dir: Path, tmp_path: Path, lines, message) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", lines)
    proc = rl_generate("--model", model_dir, "--prompts", prompts, "--output", tmp_path / "o.jsonl")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_model_dir_exits_2(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ['{"prompt": "ab"}'])
    proc = rl_generate("--model", tmp_path / "nope", "--prompts", prompts, "--output", tmp_path / "o.jsonl")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --model {tmp_path / 'nope'}: directory not found"
