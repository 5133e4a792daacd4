"""LoRA (core/tensor_parallel/lora.py): views of one set of weights, PEFT export, parity over layouts.

Single process: zero-initialised B leaves the model equal to its base; a step changes adapters only; the
merged weights (merged_weights) and a permanent merge_lora give the adapted logits, adapters_disabled the
base logits exactly; a checkpoint round trip resumes the optimizer; save_peft_adapter loads into
peft.PeftModel on the transformers model with our logits.

One 2-rank gloo world (slow) against the single-process engine, 3 AdamW steps each:
    tp2            llama, adapters split/replicated over tp (A of column / B of row replicated)
    pp2-zero1-tied qwen2 (tied embeddings, frozen): no tied-gradient sum for a frozen weight
    dp2-zero1      llama, ZeRO-1 over adapter parameters only
plus, at the layer level, a column -> row LoRA MLP at tp2 with and without sequence parallelism (forward,
input and adapter gradients) and the tp2 checkpoint loaded by a single process (tp2 -> tp1 reshard).

Tolerances (fp32): the layouts compute the same math in another summation order (a few ulps, see
tests/test_parallel_combos.py). Losses 1e-5 relative. Weights after 3 AdamW steps 2e-5 absolute: Adam's
g / sqrt(v) turns a 1e-7 relative difference of a near-zero gradient into a larger one of its update
(bounded by lr = 1e-3). A missing or doubled tp reduction of an adapter gradient moves them by ~lr.
Layer level (no optimizer): 1e-6 of each tensor's largest value. Merged vs adapted logits: 1e-5 (one extra
rounding of W + s B A). PEFT vs ours: 1e-4 (HF's attention and our fused layers sum in other orders).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from core.config import LoraConfig, OptimConfig, ParallelConfig
from core.engine import ModelEngine
from core.models import preset
from core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from core.tensor_parallel.lora import (
    adapters_disabled,
    apply_lora,
    lora_layers,
    lora_state,
    merge_lora,
    merged_weights,
)
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel
from rollout.refit import training_weights_to_hf

STEPS = 3
MICRO_BATCHES, B, T = 4, 2, 8
OPTIM = OptimConfig(lr=1e-3, min_lr=0.0, weight_decay=0.1, clip_grad=1.0)
LORA = LoraConfig(rank=4, alpha=8.0)
LOSS_RTOL, PARAM_ATOL, LAYER_RTOL = 1e-5, 2e-5, 1e-6
# dcp.save / dcp.load in this single process (no process group): expected, not worth a warning each time.
SINGLE_PROCESS_DCP = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
LAYOUTS: dict[str, tuple[str, ParallelConfig]] = {
    "tp2": ("llama_tiny", ParallelConfig(tp=2)),
    "pp2-zero1-tied": ("qwen2_tiny", ParallelConfig(pp=2, distributed_optimizer=True)),
    "dp2-zero1": ("llama_tiny", ParallelConfig(dp=2, distributed_optimizer=True)),
}


# ---- shared helpers (run in the parent and in the workers) -------------------------------------------------


def _full_state(config: TransformerConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return GPTModel(config).state_dict()


def _engine(model: str, parallel: ParallelConfig, groups: Any = None, lora: LoraConfig | None = LORA):
    config = preset(model)
    return ModelEngine(
        config, parallel, OPTIM, groups, torch.device("cpu"), _full_state(config), lora=lora, lora_seed=7
    )


def _micro_batches(step: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(MICRO_BATCHES):
        ids = torch.randint(0, vocab, (B, T + 1), generator=g)
        loss_mask = (torch.rand(B, T, generator=g) > 0.1).float()
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": loss_mask})
    return out


def _loss_fn(tp_group, n_tokens: torch.Tensor):
    def loss_fn(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
        loss_sum = (vocab_parallel_cross_entropy(logits, mb["labels"], tp_group) * mb["loss_mask"]).sum()
        return loss_sum / n_tokens, {"loss_sum": loss_sum.detach()}

    return loss_fn


def _train_step(engine: ModelEngine, step: int, dp_rank: int = 0, dp_size: int = 1) -> float:
    global_batch = _micro_batches(step, engine.config.vocab_size)
    n_tokens = torch.stack([mb["loss_mask"].sum() for mb in global_batch]).sum()
    per_rank = len(global_batch) // dp_size
    mine = global_batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    result = engine.train_step(mine, _loss_fn(engine.tp_group, n_tokens), OPTIM.clip_grad)
    return result.loss / float(n_tokens)


def _full(p: torch.Tensor, tp_group) -> torch.Tensor:
    from core.parallel.collectives import all_gather_along_dim

    tp_dim = getattr(p, "tp_dim", None)
    full = p.detach() if tp_dim is None else all_gather_along_dim(p.detach(), tp_dim, tp_group)
    return full.clone()  # never an alias: merged_weights restores the parameter in place on exit


def _merged_full(engine: ModelEngine) -> dict[str, torch.Tensor]:
    """{checkpoint name: full merged tensor} of this rank's stage (adapters hidden inside merged_weights)."""
    with engine.merged_weights():
        names = engine._ckpt_names
        return {names[p]: _full(p, engine.tp_group) for c in engine.chunks for p in c.parameters()}


def _logits(engine: ModelEngine, micro_batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    out = engine.forward_collect(micro_batches, lambda logits, mb: (logits.sum(), {"logits": logits}))
    return [o["logits"] for o in out]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# ---- single process ------------------------------------------------------------------------------------


def test_config_rejects_nonpositive_rank_and_bad_targets():
    assert LoraConfig().alpha == 16.0 and LoraConfig().targets == ["qkv", "proj", "fc1", "fc2"]
    with pytest.raises(ValueError, match="lora rank must be a positive integer, got 0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=-2)
    with pytest.raises(ValueError):
        LoraConfig(targets=["qkv", "qkv"])
    with pytest.raises(ValueError):
        LoraConfig(targets=["lm_head"])


def test_adapters_train_alone_and_every_view_matches():
    base = _engine("llama_tiny", ParallelConfig(), lora=None)
    engine = _engine("llama_tiny", ParallelConfig())
    batch = _micro_batches(9, engine.config.vocab_size)
    base_logits = _logits(base, batch)
    assert _max_diff(_logits(engine, batch), base_logits) == 0.0  # B = 0: the base model exactly

    trained = {p for p, name in engine._ckpt_names.items() if p.requires_grad}
    assert {engine._ckpt_names[p].rpartition(".")[2] for p in trained} == {"lora_A", "lora_B"}
    assert len(trained) == 2 * 4 * engine.config.num_layers
    assert set(engine.ddp._buffer_of) == trained  # grad buffers and optimizer: adapters only
    assert {s.param for s in engine.optimizer.shards} == trained
    before = {p: p.detach().clone() for p in engine._ckpt_names}
    _train_step(engine, 0)
    changed = {p for p, value in before.items() if not torch.equal(value, p)}
    assert {engine._ckpt_names[p].rpartition(".")[2] for p in changed} == {"lora_A", "lora_B"}
    assert all(p in changed for p in trained if engine._ckpt_names[p].endswith("lora_B"))

    adapted = _logits(engine, batch)
    assert _max_diff(adapted, base_logits) > 1e-4  # the step moved the model
    with adapters_disabled(engine.chunks):
        assert _max_diff(_logits(engine, batch), base_logits) == 0.0
    weights = {n: p.detach().clone() for n, p in engine.chunks[0].named_parameters()}
    with engine.merged_weights():
        assert not any("lora" in n for n, _ in engine.chunks[0].named_parameters())
        # The refit stream reads the chunks' parameters: inside, it sends the merged model under HF names.
        hf = dict(training_weights_to_hf(engine.chunks, None, engine.config))
        down = engine.chunks[0].layers["1"].mlp.linear_fc2
        assert torch.equal(hf["model.layers.1.mlp.down_proj.weight"], down.weight)
        assert not torch.equal(down.weight, weights["layers.1.mlp.linear_fc2.weight"])
        assert _max_diff(_logits(engine, batch), adapted) < 1e-5
        with pytest.raises(RuntimeError, match="merged"):
            with engine.adapters_disabled():
                pass
        with pytest.raises(RuntimeError, match="already merged"):
            with merged_weights(engine.chunks):
                pass
    restored = dict(engine.chunks[0].named_parameters())
    assert weights.keys() == restored.keys()
    assert all(torch.equal(w, restored[n]) for n, w in weights.items())  # W restored bit for bit
    assert _max_diff(_logits(engine, batch), adapted) == 0.0

    model = merge_lora(engine.chunks[0])  # permanent: plain layers, adapted logits
    assert not lora_layers(model) and type(model.layers["0"].mlp.linear_fc1) is ColumnParallelLinear
    ids = batch[0]["input_ids"]
    assert (model(ids) - adapted[0]).abs().max().item() < 1e-5


@SINGLE_PROCESS_DCP
def test_checkpoint_round_trip_resumes_adapters_and_optimizer(tmp_path):
    engine = _engine("llama_tiny", ParallelConfig())
    for step in range(2):
        _train_step(engine, step)
    dcp.save(engine.sharded_state(), checkpoint_id=str(tmp_path))
    resumed = _engine("llama_tiny", ParallelConfig())
    template = resumed.load_template(tmp_path)
    assert any(k.endswith("lora_A.exp_avg") for k in template)
    assert not any(k.startswith("optim.") and k.endswith("linear_qkv.weight.exp_avg") for k in template)
    dcp.load(template, checkpoint_id=str(tmp_path))
    resumed.finish_load(template)
    for step in (2, 3):
        assert _train_step(resumed, step) == pytest.approx(_train_step(engine, step), rel=1e-6)
    for a, b in zip(engine.chunks[0].parameters(), resumed.chunks[0].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_peft_adapter_loads_onto_transformers_model(case, tmp_path):
    peft = pytest.importorskip("peft")
    from hf_tiny import VOCAB, build_hf_model

    from core.bridge import load_hf, read_hf_config
    from core.bridge.peft import save_peft_adapter

    build_hf_model(case, tmp_path / "hf")
    arch, _ = read_hf_config(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    cfg = LoraConfig(rank=4, alpha=8.0, targets=["qkv", "proj", "fc1", "fc2"])
    apply_lora(ours, cfg, seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(ours):  # both factors random: a wrong row split or scale shows
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    save_peft_adapter(ours, ours.config, arch, tmp_path / "adapter", cfg)

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    expected = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert written["target_modules"] == expected and written["r"] == 4 and written["lora_alpha"] == 8
    hf = build_hf_model(case)  # the same base weights (same seed), fresh
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = ours(ids)
        with adapters_disabled(ours):
            base = ours(ids)
    assert (got - base).abs().max().item() > 1e-2  # the adapters matter
    assert (got - want).abs().max().item() < 1e-4


def test_peft_export_refuses_transposed_hf_linears(tmp_path):
    from core.bridge.peft import save_peft_adapter
    from core.errors import InputError

    model = GPTModel(preset("gpt2_tiny"))
    apply_lora(model, LORA)
    with pytest.raises(InputError, match="PEFT export"):
        save_peft_adapter(model, model.config, "gpt2", tmp_path, LORA)


def test_apply_lora_names_unmatched_targets():
    model = GPTModel(preset("mixtral_tiny"))
    with pytest.raises(ValueError, match=r"\['fc1', 'fc2'\] match no"):
        apply_lora(model, LORA)


# ---- layer level: a LoRA MLP at tp2 with and without sequence parallelism ---------------------------------

H, FFN = 8, 16


class _MLP(nn.Module):
    def __init__(self, tp_group, sp: bool):
        super().__init__()
        self.linear_fc1 = ColumnParallelLinear(H, FFN, True, tp_group=tp_group, sequence_parallel=sp)
        self.linear_fc2 = RowParallelLinear(FFN, H, True, tp_group=tp_group, sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(torch.nn.functional.gelu(self.linear_fc1(x)))


def _mlp_case(tp_group, sp: bool) -> dict[str, torch.Tensor]:
    """Forward/backward of the LoRA MLP; sharded tensors come back as this rank's shards."""
    from core.parallel.collectives import group_rank, group_size

    tp, rank = group_size(tp_group), group_rank(tp_group)
    g = torch.Generator().manual_seed(5)
    x, dy = torch.randn(2, 4, H, generator=g), torch.randn(2, 4, H, generator=g)
    torch.manual_seed(0)  # base weights: the same full tensors at every tp (drawn full, sharded)
    model = _MLP(tp_group, sp)
    apply_lora(model, LoraConfig(rank=2, alpha=4.0, targets=["fc1", "fc2"]), seed=1)
    with torch.no_grad():
        for layer in lora_layers(model):
            full_b = torch.randn(
                layer.lora_B.shape[0] * (tp if layer.lora_B.tp_dim == 0 else 1), 2, generator=g
            )
            layer.lora_B.copy_(full_b if layer.lora_B.tp_dim is None else full_b.chunk(tp, 0)[rank])
    if sp:
        x, dy = x.chunk(tp, 1)[rank], dy.chunk(tp, 1)[rank]
    x.requires_grad_()
    y = model(x)
    y.backward(dy)
    out = {"y": y.detach(), "dx": x.grad}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[name] = p.grad
    return out


# ---- the 2-rank world ------------------------------------------------------------------------------------


def _world(rank: int, world_size: int, ckpt_dir: str) -> dict[str, Any]:
    from core.parallel.dims import ParallelDims, build_groups

    out: dict[str, Any] = {}
    for name, (model, par) in LAYOUTS.items():
        dims = ParallelDims(tp=par.tp, dp=par.dp, pp=par.pp, world_size=world_size)
        groups = build_groups(dims, rank)
        engine = _engine(model, par, groups)
        losses = [_train_step(engine, step, groups.dp_rank, groups.dp_size) for step in range(STEPS)]
        out[name] = {"losses": losses, "merged": _merged_full(engine)}
        if name == "tp2":
            out[name]["adapters"] = lora_state(engine.chunks, groups.tp_group)
            dcp.save(engine.sharded_state(), checkpoint_id=ckpt_dir)
            out["mlp"] = {sp: _mlp_case(groups.tp_group, sp) for sp in (False, True)}
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[list[dict[str, Any]], str]:
    from dist import run_distributed

    ckpt_dir = str(tmp_path_factory.mktemp("lora_tp2_ckpt"))
    return run_distributed(_world, 2, ckpt_dir, timeout=240), ckpt_dir


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, Any]]:
    out = {}
    for model in {m for m, _ in LAYOUTS.values()}:
        engine = _engine(model, ParallelConfig())
        losses = [_train_step(engine, step) for step in range(STEPS)]
        out[model] = {"losses": losses, "merged": _merged_full(engine), "adapters": lora_state(engine.chunks)}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, world, references):
    results, _ = world
    ref = references[LAYOUTS[layout][0]]
    seen: set[str] = set()
    for rank, result in enumerate(results):
        got = result[layout]
        assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL), f"rank {rank}"
        for name, value in got["merged"].items():
            diff = (value - ref["merged"][name]).abs().max().item()
            assert diff <= PARAM_ATOL, f"rank {rank}: merged {name} differs by {diff:.1e}"
        seen |= got["merged"].keys()
    assert seen == ref["merged"].keys()  # the stages together hold every merged weight


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sequence_parallel"])
def test_lora_mlp_layer_parity(sp, world):
    results, _ = world
    ref = _mlp_case(None, sp)
    for rank, result in enumerate(results):
        got = result["mlp"][sp]
        assert got.keys() == ref.keys() and {"linear_fc1.lora_A", "linear_fc2.lora_B"} <= got.keys()
        for name, value in got.items():
            want = ref[name]
            if value.shape != want.shape:  # a tp shard (or a sequence chunk under sp): find its dim
                dim = next(d for d in range(want.dim()) if value.shape[d] != want.shape[d])
                want = want.chunk(2, dim)[rank]
            diff, scale = (value - want).abs().max().item(), want.abs().max().item()
            assert diff <= LAYER_RTOL * scale, f"rank {rank} {name}: {diff:.1e} at scale {scale:.1e}"


@pytest.mark.slow
@SINGLE_PROCESS_DCP
def test_tp2_checkpoint_loads_in_one_process(world, references):
    results, ckpt_dir = world
    engine = _engine("llama_tiny", ParallelConfig())
    template = engine.load_template(ckpt_dir)
    dcp.load(template, checkpoint_id=ckpt_dir)
    engine.finish_load(template)
    adapters = lora_state(engine.chunks)
    saved = results[0]["tp2"]["adapters"]
    assert adapters.keys() == saved.keys()
    assert all(torch.equal(adapters[n], saved[n]) for n in saved)  # resharded, not recomputed
    ref = references["llama_tiny"]
    assert all((adapters[n] - ref["adapters"][n]).abs().max() <= PARAM_ATOL for n in adapters)
    assert engine.optimizer.state and len(engine.optimizer.state) == len(engine.optimizer.shards)
