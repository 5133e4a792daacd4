"""Activation recompute (none / selective / full) and packed-document attention through flex_attention:
both must compute exactly what the plain path computes (loss, gradients), and recompute must keep less."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from numerics import close

import core.transformer.model as model_module
from core.models import preset
from core.transformer.attention import _flex, build_attention_mask, document_block_mask
from core.transformer.model import GPTModel


def tiny_config(**kw):
    base = dict(vocab_size=96, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2)
    return dataclasses.replace(preset("llama_tiny"), ffn_hidden_size=160, **(base | kw))


def packed_batch(B: int = 2, T: int = 48, vocab: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    segments = torch.zeros(B, T, dtype=torch.long)
    segments[0, 20:] = 1
    segments[0, 35:] = 2
    segments[1] = torch.arange(T) // 12
    return ids[:, :-1], ids[:, 1:], segments


def loss_and_grads(model: GPTModel, ids, labels, segments) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids, segment_ids=segments)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def with_recompute(model: GPTModel, mode: str) -> GPTModel:
    for layer in model.layers.values():
        layer.recompute = mode
    return model


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_loss_and_gradients(mode):
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    batch = packed_batch()
    want_loss, want = loss_and_grads(model, *batch)
    got_loss, got = loss_and_grads(with_recompute(model, mode), *batch)
    assert torch.equal(got_loss, want_loss)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def saved_bytes(model: GPTModel, batch) -> int:
    """Bytes of the activations autograd keeps for backward (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    ids, labels, segments = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids, segment_ids=segments)
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    return total


def test_recompute_keeps_only_the_layer_inputs_outside_the_layers():
    """Autograd's own saved tensors (seen by saved_tensors_hooks) shrink to the checkpointed layers' inputs;
    what selective keeps inside a layer is measured on the GPU below."""
    torch.manual_seed(0)
    model = GPTModel(tiny_config(num_layers=4))
    batch = packed_batch(T=64)
    kept = {mode: saved_bytes(with_recompute(model, mode), batch) for mode in ("none", "selective", "full")}
    assert kept["selective"] < 0.2 * kept["none"] and kept["full"] < 0.2 * kept["none"], kept


@pytest.mark.gpu
def test_recompute_lowers_peak_memory_on_cuda():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=512, num_attention_heads=8, num_kv_heads=8, num_layers=4)
    model = GPTModel(dataclasses.replace(config, ffn_hidden_size=1536)).to("cuda", torch.bfloat16)
    ids, labels, segments = (t.cuda() for t in packed_batch(B=8, T=1024))
    peak = {}
    for mode in ("none", "selective", "full"):
        with_recompute(model, mode)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_and_grads(model, ids, labels, segments)
        peak[mode] = torch.cuda.max_memory_allocated() - base
    assert peak["full"] < peak["selective"] < peak["none"], peak


@pytest.mark.parametrize("window", [None, 10])
def test_document_block_mask_equals_the_dense_mask(window):
    torch.manual_seed(0)
    _, _, segments = packed_batch()
    B, T = segments.shape
    q, k, v = torch.randn(B, 4, T, 16), torch.randn(B, 2, T, 16), torch.randn(B, 2, T, 16)
    got = _flex(q, k, v, document_block_mask(segments, window))
    dense = build_attention_mask(T, None, segments, window)
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=dense
    )
    close(got, want, 1e-5)


@torch.no_grad()
def test_model_with_flex_documents_equals_dense_masks(monkeypatch):
    """GPTModel's flex path (forced on the CPU here, forward only: CPU flex has no backward; on CUDA it is
    the default and the gpu test below checks gradients) vs SDPA with dense masks."""
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    ids, _, segments = packed_batch()
    model.flex = False
    want = model(ids, segment_ids=segments)
    model.flex = True
    monkeypatch.setattr(model_module, "flex_available", lambda device: True)
    assert model.flex_documents(torch.device("cpu"))
    close(model(ids, segment_ids=segments), want, 1e-5)


@pytest.mark.gpu
def test_flex_documents_on_cuda_match_dense_masks_in_bf16():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=256, num_attention_heads=8, num_kv_heads=4, num_layers=2)
    model = GPTModel(config).to("cuda", torch.bfloat16)
    ids, labels, segments = (t.cuda() for t in packed_batch(B=4, T=512))
    segments[:, 300:] += 5
    model.flex = False
    want_loss, want = loss_and_grads(model, ids, labels, segments)
    model.flex = True
    assert model.flex_documents(ids.device)
    got_loss, got = loss_and_grads(model, ids, labels, segments)
    close(got_loss.float(), want_loss.float(), 2e-2)
    for name in want:
        err = (got[name].float() - want[name].float()).norm() / want[name].float().norm().clamp_min(1e-12)
        assert err < 3e-2, (name, float(err))


def test_token_correct_is_the_argmax_hit_in_the_logits_dtype():
    from core.tensor_parallel.cross_entropy import vocab_parallel_token_correct

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50).to(torch.bfloat16)
    target = torch.randint(0, 50, (3, 7))
    target[0, :3] = logits[0, :3].float().argmax(-1)
    logits[1, 0, 5] = logits[1, 0].max()  # a tie with the maximum counts as correct
    target[1, 0] = 5
    want = (logits.float().gather(-1, target[..., None])[..., 0] >= logits.float().max(-1).values).float()
    got = vocab_parallel_token_correct(logits, target, None)
    assert torch.equal(got, want) and got[0, :3].eq(1).all() and got[1, 0] == 1
