"""Pruning passes: masks as annotations and buffers, and baking them in. Importing this package registers them.

``prune_magnitude``, ``prune_lamp``, ``prune_random`` (ERK), ``prune_nm``, ``prune_gradual``
and ``prune_rd`` install masks the graph applies; ``prune_channels`` shrinks layers;
``apply_masks`` bakes masks into weights. `report` shows what pruning did.
"""

from lowbit.passes.prune.apply import ApplyMasks
from lowbit.passes.prune.channels import PruneChannels
from lowbit.passes.prune.gradual import GradualPruning, PruneGradual, cubic_sparsity
from lowbit.passes.prune.lamp import PruneLAMP, lamp_scores
from lowbit.passes.prune.magnitude import PruneMagnitude
from lowbit.passes.prune.masks import PruneConfig, PruningError
from lowbit.passes.prune.nm import PruneNM, is_nm, nm_mask
from lowbit.passes.prune.random import PruneRandom, erk_sparsities
from lowbit.passes.prune.rd import PruneRD
from lowbit.passes.prune.report import plot_sparsity, sparsity_rows, sparsity_table

__all__ = [
    "ApplyMasks",
    "GradualPruning",
    "PruneChannels",
    "PruneConfig",
    "PruneGradual",
    "PruneLAMP",
    "PruneMagnitude",
    "PruneNM",
    "PruneRD",
    "PruneRandom",
    "PruningError",
    "cubic_sparsity",
    "erk_sparsities",
    "is_nm",
    "lamp_scores",
    "nm_mask",
    "plot_sparsity",
    "sparsity_rows",
    "sparsity_table",
]
