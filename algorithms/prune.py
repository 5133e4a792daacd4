"""Structured pruning (Minitron, Muralidharan et al. 2024): a smaller model cut from a trained one by the
importance of its parts, measured from activations on calibration data.

Importance (one forward pass over the calibration rows, the whole model on the CPU in fp32):
  layers           block influence: 1 - cos(layer input, layer output), mean over tokens (low: the layer
                   barely changes the residual stream); the least influential layers are dropped
  attention heads  mean L2 norm of each query head's output (the input of linear_proj, per head)
  MLP channels     mean |activation| entering linear_fc2
  embedding chans  mean |output| of every norm (input_norm, pre_mlp_norm, final_norm), summed
Pruning keeps the most important parts down to `target` (any of num_layers, hidden_size, ffn_hidden_size,
num_attention_heads). Heads are pruned within each GQA group alike (every kv head is kept), so the target
head count is a multiple of num_kv_heads. The result is written in our format (model/: model_config.json +
model.safetensors + the tokenizer, a source any stage's model.init_from takes) and as hf/. Dense Llama-family models (RMSNorm, SwiGLU or GELU, no
MoE, no learned positions) are supported; others are refused in one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from algorithms.model_config import SourceModelConfig
from algorithms.sft import SFTDataConfig, SFTSyntheticConfig, read_sft_rows
from algorithms.trainer import LoopConfig
from core.config import ParallelConfig, RunConfig, Schema
from core.errors import InputError
from core.transformer.model import GPTModel


class PruneTarget(Schema):
    """The pruned shape; unset fields keep the source's."""

    num_layers: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=1)
    ffn_hidden_size: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)


class PruneConfig(LoopConfig):
    """The loop sections `rl` commands share; parallel names the layout the pruned model must fit (heads
    and kv heads per tp rank, layers per pp stage); the training sections are unused (no optimizer step)."""

    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/prune"))
    model: SourceModelConfig
    target: PruneTarget
    data: SFTDataConfig = Field(
        default_factory=lambda: SFTDataConfig(synthetic=SFTSyntheticConfig()),
        description="calibration rows (the SFT formats)",
    )
    calibration_rows: int = Field(64, ge=1, description="rows whose activations rank the parts")


# ---------------------------------------------------------------------------------------------- checks


def target_config(source: Any, target: PruneTarget, parallel: ParallelConfig) -> Any:
    """The pruned TransformerConfig; InputError (one line) for a target the source cannot be cut to."""
    if source.is_moe or source.position_embedding != "rope" or source.norm != "rmsnorm":
        raise InputError("rl prune: only dense RoPE + RMSNorm models (the Llama family) are supported")
    fields = {k: v for k, v in target.model_dump().items() if v is not None}
    for key, want in fields.items():
        have = getattr(source, key)
        if want > have:
            raise InputError(f"target.{key}={want} is larger than the model's {key}={have}")
    heads = fields.get("num_attention_heads", source.num_attention_heads)
    kv = source.num_kv_heads or source.num_attention_heads
    if heads % kv:
        raise InputError(
            f"target.num_attention_heads={heads} is not a multiple of num_kv_heads={kv} (heads are pruned "
            "alike in every kv group)"
        )
    ffn = fields.get("ffn_hidden_size", source.ffn_hidden_size)
    # head_dim stays (every config sets it explicitly); a dense model's moe_ffn_hidden_size follows ffn
    config = dataclasses.replace(source, **fields, moe_ffn_hidden_size=ffn)
    parallel.check_model(config)
    return config


# ------------------------------------------------------------------------------------------ importance


@torch.no_grad()
def importance(model: GPTModel, rows: list[list[int]]) -> dict[str, Any]:
    """Activation statistics of `rows` (token ids, each run alone: no padding): per layer block influence
    (n_layers,), head norms [(n_heads,)], MLP channel means [(ffn,)], and embedding channel means (H,)."""
    cfg = model.config
    n = len(model.layers)
    stats: dict[str, Any] = {
        "layers": torch.zeros(n),
        "heads": [torch.zeros(cfg.num_attention_heads) for _ in range(n)],
        "ffn": [torch.zeros(cfg.ffn_hidden_size) for _ in range(n)],
        "hidden": torch.zeros(cfg.hidden_size),
    }
    d = cfg.head_dim

    def layer_hook(i: int):
        def hook(module, args, output):  # args[0], output: (1, T, H)
            cos = torch.nn.functional.cosine_similarity(args[0], output, dim=-1)  # (1, T)
            stats["layers"][i] += (1 - cos).mean()

        return hook

    def heads_hook(i: int):
        def hook(module, args):  # args[0]: (1, T, n_heads * d)
            x = args[0].unflatten(-1, (-1, d))  # (1, T, n_heads, d)
            stats["heads"][i] += x.norm(dim=-1).mean(dim=(0, 1))

        return hook

    def ffn_hook(i: int):
        def hook(module, args):  # args[0]: (1, T, ffn)
            stats["ffn"][i] += args[0].abs().mean(dim=(0, 1))

        return hook

    def norm_hook(module, args, output):  # (1, T, H)
        stats["hidden"] += output.abs().mean(dim=(0, 1))

    handles = [model.final_norm.register_forward_hook(norm_hook)]
    for i, layer in enumerate(model.layers.values()):
        handles += [
            layer.register_forward_hook(layer_hook(i)),
            layer.self_attention.linear_proj.register_forward_pre_hook(heads_hook(i)),
            layer.mlp.linear_fc2.register_forward_pre_hook(ffn_hook(i)),
            layer.input_norm.register_forward_hook(norm_hook),
            layer.pre_mlp_norm.register_forward_hook(norm_hook),
        ]
    model.eval()
    try:
        for ids in rows:
            x = torch.tensor([ids])
            model(input_ids=x, position_ids=torch.arange(len(ids)).unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return stats


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order."""
    return scores.topk(k).indices.sort().values


# ------------------------------------------------------------------------------------------------ prune


@torch.no_grad()
def prune(model: GPTModel, config: Any, stats: dict[str, Any]) -> GPTModel:
    """The model cut to `config` (from target_config), keeping the most important layers, heads, MLP
    channels and embedding channels by `stats` (from importance)."""
    src = model.config
    kv = src.num_kv_heads or src.num_attention_heads
    d = src.head_dim
    group, new_group = src.num_attention_heads // kv, config.num_attention_heads // kv
    layers = _top(stats["layers"], config.num_layers).tolist()
    hid = _top(stats["hidden"], config.hidden_size)  # (H',)
    state = model.state_dict()
    out = {
        "embedding.word_embeddings.weight": state["embedding.word_embeddings.weight"][:, hid],
        "final_norm.weight": state["final_norm.weight"][hid],
    }
    if "output_layer.weight" in state and not src.tie_embeddings:
        out["output_layer.weight"] = state["output_layer.weight"][:, hid]
    for new, old in enumerate(layers):
        p, q = f"layers.{old}.", f"layers.{new}."
        # heads: the top new_group query heads of every kv group, then that group's k and v
        scores = stats["heads"][old].view(kv, group)  # (kv, group)
        kept = [_top(scores[g], new_group).tolist() for g in range(kv)]  # per group, query heads kept
        keep_q = [g * group + j for g in range(kv) for j in kept[g]]
        qkv_heads = [
            g * (group + 2) + j for g in range(kv) for j in [*kept[g], group, group + 1]
        ]  # q.., k, v
        qkv_rows = torch.tensor([h * d + r for h in qkv_heads for r in range(d)])
        proj_cols = torch.tensor([h * d + r for h in keep_q for r in range(d)])
        ch = _top(stats["ffn"][old], config.ffn_hidden_size)  # (ffn',)
        fc1_rows = torch.stack([2 * ch, 2 * ch + 1], 1).flatten() if src.activation == "swiglu" else ch
        for name, t in state.items():
            if not name.startswith(p) or name.endswith("inv_freq"):
                continue
            key = name[len(p) :]
            if key in ("input_norm.weight", "pre_mlp_norm.weight"):
                t = t[hid]
            elif key == "self_attention.linear_qkv.weight":
                t = t[qkv_rows][:, hid]
            elif key == "self_attention.linear_qkv.bias":
                t = t[qkv_rows]
            elif key == "self_attention.linear_proj.weight":
                t = t[hid][:, proj_cols]
            elif key in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
                t = t[hid]
            elif key == "mlp.linear_fc1.weight":
                t = t[fc1_rows][:, hid]
            elif key == "mlp.linear_fc1.bias":
                t = t[fc1_rows]
            elif key == "mlp.linear_fc2.weight":
                t = t[hid][:, ch]
            elif not key.startswith("self_attention.q_norm") and not key.startswith("self_attention.k_norm"):
                raise InputError(f"rl prune: no pruning rule for parameter {key}")
            out[q + key] = t.clone()
    pruned = GPTModel(config)
    missing, unexpected = pruned.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq") and k != "output_layer.weight"]
    if missing or unexpected:
        raise RuntimeError(f"prune: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return pruned


# ------------------------------------------------------------------------------------------------- run


def calibration_rows(cfg: PruneConfig, tokenizer: Any) -> list[list[int]]:
    from core.data.alignment import build_sft_examples

    rows, _, _ = read_sft_rows(cfg, Path(cfg.run.dir))
    max_len = cfg.data.max_len or cfg.data.seq_len + 1
    examples = build_sft_examples(rows[: cfg.calibration_rows], tokenizer, max_len, cfg.data.truncation)
    return [e.input_ids for e in examples]


def run_prune(cfg: PruneConfig, resume: str = "") -> dict[str, float]:
    """Checks the source and the target, then ranks, prunes and writes checkpoints/step_0 and hf/."""
    from algorithms.alignment_inputs import source_tokenizer
    from algorithms.rl_inputs import init_config, load_init
    from core.bridge import save_hf
    from core.bridge.native import save_native

    source, tokenizer, tokenizer_dir = source_tokenizer(cfg.model)
    config = target_config(init_config(source), cfg.target, cfg.parallel)
    rows = calibration_rows(cfg, tokenizer)
    model, arch = load_init(source)
    pruned = prune(model, config, importance(model, rows))
    run_dir = Path(cfg.run.dir)
    save_native(pruned, run_dir / "model", arch=arch)
    tokenizer.save_pretrained(run_dir / "model")  # a model source with its tokenizer
    save_hf(pruned, run_dir / "hf", arch=arch, tokenizer_dir=tokenizer_dir)
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in pruned.parameters())
    return {"prune/params": float(n_after), "prune/params_frac": n_after / n_before}
