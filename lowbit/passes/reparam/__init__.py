"""Weight reparameterization passes (training-time) and their exact fold. Importing this package registers them.

``weight_norm``, ``weight_compander`` and ``qkr`` rewrite a graph for training;
``statsq`` adds OFQ's StatsQ weight fake-quantizer (with `CGA` for the annealing phase);
``fold_reparam`` folds every reparameterization back into plain weights and
``convert_statsq`` packs trained StatsQ weights. See docs/reparam.md. ``fold_batchnorm`` folds
inference-mode BatchNorm into the layer before it (docs/methods.md).
"""

from lowbit.passes.reparam.cga import CGA, frozen_mask
from lowbit.passes.reparam.common import ReparamError
from lowbit.passes.reparam.fold import FoldReparam
from lowbit.passes.reparam.fold_batchnorm import FoldBatchNorm
from lowbit.passes.reparam.qkr import QKR, QKRLinear
from lowbit.passes.reparam.statsq import ConvertStatsQ, StatsQ, StatsQuant, statsq_quantize
from lowbit.passes.reparam.weight_compander import (
    Compander,
    CompanderInitError,
    CompanderStepRescaling,
    WeightCompander,
    compander_decay_penalty,
    compander_param_groups,
)
from lowbit.passes.reparam.weight_norm import WeightNorm, ZeroNormError

__all__ = [
    "CGA",
    "Compander",
    "CompanderInitError",
    "CompanderStepRescaling",
    "ConvertStatsQ",
    "FoldBatchNorm",
    "FoldReparam",
    "QKR",
    "QKRLinear",
    "ReparamError",
    "StatsQ",
    "StatsQuant",
    "WeightCompander",
    "WeightNorm",
    "ZeroNormError",
    "compander_decay_penalty",
    "compander_param_groups",
    "frozen_mask",
    "statsq_quantize",
]
