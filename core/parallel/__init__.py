"""Process-group layout (ParallelDims, Groups) and autograd collectives. No global groups."""

from core.parallel.collectives import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence,
    scatter_to_sequence,
    scatter_to_tp,
)
from core.parallel.dims import (
    AXES,
    Groups,
    ParallelDims,
    RankCoords,
    build_groups,
    group_ranks,
    members,
    rank_coords,
    validate_model_layout,
)

__all__ = [
    "AXES",
    "Groups",
    "ParallelDims",
    "RankCoords",
    "build_groups",
    "copy_to_tp",
    "gather_from_sequence",
    "gather_from_tp",
    "group_ranks",
    "members",
    "rank_coords",
    "reduce_from_tp",
    "reduce_scatter_to_sequence",
    "scatter_to_sequence",
    "scatter_to_tp",
    "validate_model_layout",
]
