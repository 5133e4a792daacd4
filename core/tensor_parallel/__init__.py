from core.tensor_parallel.cross_entropy import (
    vocab_parallel_cross_entropy,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)
from core.tensor_parallel.init import (
    InitMethod,
    full_shape,
    init_sharded_,
    init_tp_param_,
    normal_init,
    scaled_normal_init,
)
from core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    allreduce_sequence_parallel_grads,
    tp_rank,
    tp_size,
)
from core.tensor_parallel.random import TP_RNG, RNGStatesTracker, seed_model_parallel

__all__ = [
    "TP_RNG",
    "ColumnParallelLinear",
    "InitMethod",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "allreduce_sequence_parallel_grads",
    "full_shape",
    "init_sharded_",
    "init_tp_param_",
    "normal_init",
    "scaled_normal_init",
    "seed_model_parallel",
    "tp_rank",
    "tp_size",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
]
