"""GPTModel on its own: config validation, packing, pipeline-stage splits, TP-invariant fused layouts, MoE."""

from __future__ import annotations

import pytest
import torch

from core.errors import InputError
from core.models import PRESETS, preset
from core.models.layouts import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from core.tensor_parallel import tp_rank, tp_size
from core.transformer.attention import position_ids_from_segments
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel

TINY = sorted(name for name in PRESETS if name.endswith("_tiny"))


def _model(name: str, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(preset(name)).eval()


def _ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_config_validation():
    with pytest.raises(InputError, match="not divisible by num_kv_heads"):
        TransformerConfig(vocab_size=8, hidden_size=64, num_layers=1, num_attention_heads=4, num_kv_heads=3)
    with pytest.raises(InputError, match="rope_scaling"):
        TransformerConfig(
            vocab_size=8, hidden_size=64, num_layers=1, num_attention_heads=4, rope_scaling={"factor": 8}
        )
    cfg = TransformerConfig(vocab_size=8, hidden_size=64, num_layers=1, num_attention_heads=4)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.ffn_hidden_size) == (4, 16, 256)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg


def test_position_ids_restart_per_segment():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(position_ids_from_segments(segments), want)


@pytest.mark.parametrize("name", ["llama_tiny", "gpt2_tiny", "mixtral_tiny"])
@torch.no_grad()
def test_packed_documents_match_separate_runs(name):
    """Two documents packed in one row (plus padding) give each document's own logits."""
    model = _model(name)
    a, b = _ids(1, 5, seed=1), _ids(1, 7, seed=2)
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # (1, 15)
    segments = torch.tensor([[0] * 5 + [1] * 7 + [2] * 3])
    mask = torch.tensor([[1] * 12 + [0] * 3])
    logits = model(packed, attention_mask=mask, segment_ids=segments)
    torch.testing.assert_close(logits[:, :5], model(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[:, 5:12], model(b), atol=1e-5, rtol=0)


@torch.no_grad()
def test_all_ones_mask_equals_causal_fast_path():
    model = _model("llama_tiny")
    ids = _ids(2, 9)
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)), model(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_tiny", "mixtral_tiny"])  # tied and untied output heads
@torch.no_grad()
def test_pipeline_stages_compose_to_the_full_model(name):
    full = _model(name)
    cfg = full.config
    first = GPTModel(cfg, layer_range=(0, 1), post_process=False)
    last = GPTModel(cfg, layer_range=(1, cfg.num_layers), pre_process=False)
    state = full.state_dict()  # lists a tied head under both names
    for stage in (first, last):
        missing, unexpected = stage.load_state_dict({k: state[k] for k in stage.state_dict()})
        assert not missing and not unexpected
    assert [n for n, _ in last.named_parameters()][0] == "layers.1.input_norm.weight"
    ids = _ids(2, 8)
    torch.testing.assert_close(last(hidden_states=first(ids)), full(ids), atol=1e-6, rtol=0)


def test_fused_layouts_are_tp_invariant():
    """A contiguous 1/tp row shard of a fused tensor is the fusion of the matching HF shards."""
    d, n_heads, n_kv, hidden, ffn, tp = 4, 8, 4, 6, 10, 2
    q, k, v = torch.randn(n_heads * d, hidden), torch.randn(n_kv * d, hidden), torch.randn(n_kv * d, hidden)
    qkv = fuse_qkv(q, k, v, head_dim=d)
    assert all(torch.equal(x, y) for x, y in zip(split_qkv(qkv, d, n_heads // n_kv), (q, k, v)))
    for r, shard in enumerate(qkv.chunk(tp)):
        local = [t.chunk(tp)[r] for t in (q, k, v)]
        assert torch.equal(shard, fuse_qkv(*local, head_dim=d))
    gate, up = torch.randn(ffn, hidden), torch.randn(ffn, hidden)
    gate_up = fuse_gate_up(gate, up)
    assert all(torch.equal(x, y) for x, y in zip(split_gate_up(gate_up), (gate, up)))
    for r, shard in enumerate(gate_up.chunk(tp)):
        assert torch.equal(shard, fuse_gate_up(gate.chunk(tp)[r], up.chunk(tp)[r]))


def test_moe_aux_loss_and_gradients():
    model = _model("mixtral_tiny").train()
    logits = model(_ids(2, 16))
    assert torch.isfinite(model.aux_loss) and model.aux_loss > 0
    (logits.logsumexp(-1).mean() + model.aux_loss).backward()
    experts = model.layers["0"].mlp.experts
    assert experts.w_gate_up.ep_dim == 0 and experts.w_gate_up.tp_dim is None
    assert model.layers["0"].mlp.router.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_run_and_tag_every_parameter(name):
    model = _model(name)
    assert model(_ids(2, 6)).shape == (2, 6, model.config.vocab_size)
    assert all(hasattr(p, "tp_dim") for p in model.parameters())
    assert model.config.tie_embeddings == (
        model.output_layer.weight is model.embedding.word_embeddings.weight
    )


def test_large_presets_are_valid_configs():
    assert preset("llama_1b").hidden_size == 2048
    for name in set(PRESETS) - set(TINY):
        assert preset(name).num_layers > 2
    with pytest.raises(InputError, match="unknown model preset"):
        preset("nope")


# ---- tensor parallelism: a tp=2 gloo world against the single-process model ----------------------------
# Tolerance: max |diff| <= 1e-5 * max |reference| per tensor. The sharded model differs only in summation
# order (all-reduced half-length dot products); measured errors are <= 1e-6 of each tensor's scale, while
# a wrong shard layout or a missing reduction gives errors of the order of the tensor itself. (Per-element
# rtol is meaningless for gradient entries that are sums with cancellation.)


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert got.shape == want.shape and err <= 1e-5 * scale, f"{what}: max |diff| {err:.2e}, scale {scale:.2e}"


TP_CASES = {
    "gqa_bias_tied": dict(preset="qwen2_tiny"),  # GQA with n_kv = tp, q/k/v biases, tied head
    "qk_norm": dict(preset="qwen3_tiny"),
    "gpt2": dict(preset="gpt2_tiny"),  # learned positions, LayerNorm, GELU, biases everywhere
    "moe": dict(preset="mixtral_tiny"),  # replicated experts
}


def _tp_forward_backward(config: TransformerConfig, tp_group=None) -> dict[str, torch.Tensor]:
    """Same seed -> same full weights at any tp (init draws full tensors). Returns logits and grads."""
    torch.manual_seed(0)
    model = GPTModel(config, tp_group=tp_group)
    ids, mask = _ids(2, 8, seed=3), torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    logits = model(ids, attention_mask=mask)  # (B, T, V / tp)
    dy = torch.randn(2, 8, config.vocab_size, generator=torch.Generator().manual_seed(4))
    dy = dy.chunk(tp_size(tp_group), dim=-1)[tp_rank(tp_group)]  # this rank's vocab shard
    ((logits * dy).sum() + model.aux_loss).backward()
    return {"logits": logits.detach()} | {n: p.grad for n, p in model.named_parameters()}


def _tp_world(rank: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    tp_group = torch.distributed.new_group(list(range(world_size)))
    return {case: _tp_forward_backward(preset(c["preset"]), tp_group) for case, c in TP_CASES.items()}


@pytest.fixture(scope="module")
def tp_world() -> list[dict[str, dict[str, torch.Tensor]]]:
    from dist import run_distributed

    return run_distributed(_tp_world, 2, timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TP_CASES))
def test_tensor_parallel_matches_single_process(case, tp_world):
    config = preset(TP_CASES[case]["preset"])
    tp_dims = {n: p.tp_dim for n, p in GPTModel(config).named_parameters()}
    want = _tp_forward_backward(config)
    ranks = [r[case] for r in tp_world]
    got_logits = torch.cat([r["logits"] for r in ranks], dim=-1)
    _assert_close_to_scale(got_logits, want["logits"], "logits")
    for name, tp_dim in tp_dims.items():
        shards = [r[name] for r in ranks]
        for got in shards if tp_dim is None else [torch.cat(shards, dim=tp_dim)]:
            _assert_close_to_scale(got, want[name], name)
