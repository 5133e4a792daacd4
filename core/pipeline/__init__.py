"""Pipeline parallelism: stage layout and tied embeddings, p2p transfers, 1F1B / interleaved schedules."""

from core.pipeline.layout import (
    allreduce_tied_embedding_grads,
    build_embedding_group,
    build_stage_modules,
    stage_layer_ranges,
    tied_embedding_weight,
    unwrap_model,
)
from core.pipeline.p2p import StageLinks
from core.pipeline.schedules import (
    LossFn,
    MicroBatch,
    Schedule,
    forward_backward_1f1b,
    forward_backward_interleaved,
    forward_backward_no_pipelining,
    get_schedule,
)

__all__ = [
    "LossFn",
    "MicroBatch",
    "Schedule",
    "StageLinks",
    "allreduce_tied_embedding_grads",
    "build_embedding_group",
    "build_stage_modules",
    "forward_backward_1f1b",
    "forward_backward_interleaved",
    "forward_backward_no_pipelining",
    "get_schedule",
    "stage_layer_ranges",
    "tied_embedding_weight",
    "unwrap_model",
]
