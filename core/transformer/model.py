"""GPTModel: embedding -> decoder layers -> final norm -> vocab-parallel output head.

Parameter names (stable across pipeline splits: layers are keyed by their global index):
    embedding.word_embeddings.weight                     (V/tp, H)
    embedding.position_embeddings.weight                 (max_pos, H)        learned positions only
    layers.{i}.input_norm.{weight,bias}
    layers.{i}.self_attention.linear_qkv.{weight,bias}   fused QKV, layout in attention.py
    layers.{i}.self_attention.{q_norm,k_norm}.weight     qk_norm only
    layers.{i}.self_attention.linear_proj.{weight,bias}
    layers.{i}.pre_mlp_norm.{weight,bias}
    layers.{i}.mlp.linear_fc1.{weight,bias}              fused gate/up (SwiGLU), layout in mlp.py
    layers.{i}.mlp.linear_fc2.{weight,bias}
    layers.{i}.mlp.router.weight                         MoE: (E, H)
    layers.{i}.mlp.experts.{w_gate_up,w_down}            MoE: (E, 2F, H), (E, H, F)
    final_norm.{weight,bias}
    output_layer.weight                                  (V/tp, H); the embedding's weight when tied
    value_head.{weight,bias}                             (1, H), (1,)   config.head == "value", replaces output_layer

Initialisation: weights ~ N(0, init_std), the residual-branch outputs (linear_proj, linear_fc2, experts.w_down)
~ N(0, init_std / sqrt(2 * num_layers)), biases 0, norm scales 1. Every weight is drawn full-size and sharded
(core.tensor_parallel.init), so the same seed gives the same full model at any tp.
Context parallelism (cp_group): layout and attention in context_parallel.py; the MoE load-balancing loss is
then computed over each rank's local tokens only (not equal to the cp=1 value).
Expert parallelism (ep_group, Groups.ep_group): every MoE layer keeps E/ep experts per rank (moe.py); expert
params (ep_dim) are reduced over expert-data-parallel (Groups.edp_group), all others over dp x cp.
Value head (config.head == "value"): a plain nn.Linear(H, 1) replicated over tp. Without sequence parallelism
the final hidden states are identical on every tp rank (the last RowParallelLinear all-reduces), so are the
head's outputs and gradients: no tp communication and no reduction (clip counts it once, as any replicated
param). With sequence parallelism it would need a gather over tp first.
Not supported yet: sequence parallelism (the TP layers have it; norms, MoE and masks here assume full T).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from core.parallel.collectives import group_size
from core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding, init_tp_param_, normal_init
from core.transformer.attention import (
    RopeCache,
    SelfAttention,
    build_attention_mask,
    document_block_mask,
    flex_available,
    position_ids_from_segments,
)
from core.transformer.config import TransformerConfig
from core.transformer.context_parallel import build_cp_attention_mask
from core.transformer.mlp import MLP
from core.transformer.moe import MoE
from core.transformer.norm import build_norm
from core.transformer.recompute import Recompute, run_layer
from core.transformer.rope import rope_cos_sin, rope_inv_freq


class Embedding(nn.Module):
    def __init__(self, config: TransformerConfig, tp_group: dist.ProcessGroup | None = None):
        super().__init__()
        init = normal_init(config.init_std)
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_group=tp_group, init_method=init
        )
        self.position_embeddings: nn.Embedding | None = None
        if config.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            self.position_embeddings.weight.tp_dim = None
            init_tp_param_(self.position_embeddings.weight, init, tp_group=None)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids, position_ids (B, T) -> (B, T, H)."""
        h = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            h = h + self.position_embeddings(position_ids)
        return h


class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). recompute: none | selective | full
    activation recompute in training (core/transformer/recompute.py; ModelEngine sets it)."""

    recompute: Recompute = "none"

    def __init__(
        self,
        config: TransformerConfig,
        tp_group: dist.ProcessGroup | None = None,
        cp_group: dist.ProcessGroup | None = None,
        ep_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        self.input_norm = build_norm(config, config.hidden_size)
        self.self_attention = SelfAttention(config, tp_group, cp_group)
        self.pre_mlp_norm = build_norm(config, config.hidden_size)
        self.mlp = MoE(config, tp_group, ep_group) if config.is_moe else MLP(config, tp_group)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeCache | None,
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H)."""
        return run_layer(self.recompute, self._forward, x, rope, mask, token_mask)

    def _forward(
        self,
        x: torch.Tensor,
        rope: RopeCache | None,
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attention(self.input_norm(x), rope, mask)
        h = self.pre_mlp_norm(x)
        return x + (self.mlp(h, token_mask) if isinstance(self.mlp, MoE) else self.mlp(h))


class GPTModel(nn.Module):
    """Decoder-only LM, or one pipeline stage of it.

    layer_range=(start, end) builds global layers [start, end). pre_process: owns the embedding and takes
    input_ids; otherwise takes hidden_states (B, T, H). post_process: owns final norm and output head and
    returns vocab-local logits (B, T, V/tp) (or values (B, T, 1) when config.head == "value"); otherwise returns hidden states (B, T, H).
    After forward, `aux_loss` is this stage's share of moe_aux_loss_coeff * mean over all layers of the
    load-balancing loss (zero for dense models), so that the stages' shares add up to the model's.
    flex: packed documents (segment_ids, no padding) attend through flex_attention on CUDA; False keeps
    SDPA with a dense (B, 1, T, T) mask there too.
    """

    flex: bool = True

    def __init__(
        self,
        config: TransformerConfig,
        tp_group: dist.ProcessGroup | None = None,
        layer_range: tuple[int, int] | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        cp_group: dist.ProcessGroup | None = None,
        ep_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        self.config = config
        self.cp_group = cp_group
        self.pre_process, self.post_process = pre_process, post_process
        start, end = layer_range or (0, config.num_layers)
        if not 0 <= start <= end <= config.num_layers:
            raise ValueError(f"layer_range={layer_range} is outside [0, {config.num_layers}]")
        if pre_process:
            self.embedding = Embedding(config, tp_group)
        self.layers = nn.ModuleDict(
            {str(i): TransformerLayer(config, tp_group, cp_group, ep_group) for i in range(start, end)}
        )
        if post_process:
            self.final_norm = build_norm(config, config.hidden_size)
        if post_process and config.head == "value":
            self.value_head = nn.Linear(config.hidden_size, 1)
            for p in self.value_head.parameters():
                p.tp_dim = None
            init_tp_param_(self.value_head.weight, normal_init(config.init_std), tp_group=None)
            nn.init.zeros_(self.value_head.bias)
        elif post_process:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                config.vocab_size,
                bias=False,
                tp_group=tp_group,
                init_method=normal_init(config.init_std),
            )
            if config.tie_embeddings and pre_process:
                # Same (V/tp, H) shard on both sides; a tied last stage alone keeps its own copy.
                self.output_layer.weight = self.embedding.word_embeddings.weight
        self.aux_loss: torch.Tensor | None = None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        *,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) [first stage] or hidden_states (B, T, H) [later stages].

        attention_mask (B, T): 1 = token, 0 = padding. segment_ids (B, T): document ids of packed rows, no
        attention across documents; position_ids then default to restarting per document (else 0..T-1).
        Returns logits (B, T, V/tp) (values (B, T, 1) for head="value") on the last stage, else hidden states (B, T, H).
        Under context parallelism (cp_group of size cp > 1) every (B, T) input is this rank's split_for_cp
        of the full rows (T = T_full / cp) and position_ids (global positions) are required.
        """
        x = self._stage_input(input_ids, hidden_states)
        B, T = x.shape[:2]
        if position_ids is None:
            if group_size(self.cp_group) > 1:
                raise ValueError(
                    "GPTModel with cp > 1 needs position_ids: pass the split_for_cp of the full rows' "
                    "global position ids (tokens on a cp rank are not contiguous)"
                )
            position_ids = (
                position_ids_from_segments(segment_ids)
                if segment_ids is not None
                else torch.arange(T, device=x.device).expand(B, T)
            )
        if self.pre_process:
            x = self.embedding(input_ids, position_ids)
        rope = self._rope(position_ids, x.dtype)
        mask = self._attention_mask(T, attention_mask, segment_ids, x.device)
        for layer in self.layers.values():
            x = layer(x, rope, mask, attention_mask)
        self.aux_loss = self._aux_loss(x)
        if not self.post_process:
            return x
        if self.config.head == "value":
            return self.value_head(self.final_norm(x))  # (B, T, 1)
        return self.output_layer(self.final_norm(x))

    def _stage_input(
        self, input_ids: torch.Tensor | None, hidden_states: torch.Tensor | None
    ) -> torch.Tensor:
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage takes input_ids")
            return input_ids
        if hidden_states is None:
            raise ValueError("a pipeline stage without pre_process takes hidden_states")
        return hidden_states

    def flex_documents(self, device: torch.device) -> bool:
        """Packed documents through flex_attention (CUDA, cp = 1, unless self.flex is False)."""
        return self.flex and flex_available(device) and group_size(self.cp_group) == 1

    def _attention_mask(
        self,
        T: int,
        attention_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """(B or 1, 1, T, T * cp) boolean mask, or None for plain causal attention (never under cp > 1); for
        packed documents without padding on CUDA a flex BlockMask (flash-speed, no (B, T, T) tensor)."""
        window = self.config.sliding_window
        if segment_ids is not None and attention_mask is None and self.flex_documents(device):
            return document_block_mask(segment_ids, window)
        if group_size(self.cp_group) == 1:
            return build_attention_mask(T, attention_mask, segment_ids, window, device)
        return build_cp_attention_mask(T, attention_mask, segment_ids, window, self.cp_group, device)

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> RopeCache | None:
        cfg = self.config
        if cfg.position_embedding != "rope":
            return None
        return rope_cos_sin(
            position_ids, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), dtype
        )

    def _aux_loss(self, x: torch.Tensor) -> torch.Tensor:
        moes = [layer.mlp for layer in self.layers.values() if isinstance(layer.mlp, MoE)]
        total = sum((m.aux_loss for m in moes), torch.zeros((), device=x.device))
        return self.config.moe_aux_loss_coeff * total / self.config.num_layers
