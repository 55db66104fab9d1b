"""``fold_reparam``: replace every weight reparameterization by the plain weight it computes.

Weight norm and the compander become the layer's ordinary ``weight`` (``g·V/‖V‖``,
``a·arctan(V/b)``), and a QKR block's ``QKRLinear`` becomes a bias-free ``nn.Linear`` holding
the stacked ``W_qk`` product, at the same module path. The folded weight is evaluated by
the same expression the training forward used, so the graph computes exactly what it did.
A fake-quantizer stacked on top (StatsQ) is kept on the folded weight, for
``convert_statsq``. Quantizers forbid "reparam", so this pass must run before them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from lowbit.ir.annotations import get_meta
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig
from lowbit.passes.registry import register
from lowbit.passes.reparam.common import ReparamError, clear_annotation, reparam_output, replace_first_parametrization
from lowbit.passes.reparam.qkr import QKRLinear
from lowbit.passes.reparam.weight_compander import Compander

log = logging.getLogger(__name__)

#: Parametrizations that are weight reparameterizations (folded), as opposed to fake-quantizers (kept).
REPARAMETRIZATIONS: tuple[type[nn.Module], ...] = (parametrizations._WeightNorm, Compander)


@dataclass(frozen=True)
class FoldReparamConfig(PassConfig):
    """Options of the ``fold_reparam`` pass (none)."""


@register
class FoldReparam(Pass):
    """Fold weight norm, compander and QKR back into plain layers (exact)."""

    name = "fold_reparam"
    Config = FoldReparamConfig
    stage = "convert"
    consumes = frozenset({"reparam"})
    pattern = "reparameterized layers"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        calls: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            meta = get_meta(node)
            if meta is not None and meta.reparam is not None:
                calls.setdefault(meta.layer, []).append(node)
        records = []
        for path, nodes in calls.items():
            if any(n.op != "call_module" or n.target != path for n in nodes):
                raise ReparamError(
                    f"fold_reparam: layer '{path}' is annotated as reparameterized but is not a call of '{path}'"
                )
            records.append(_fold(gm, path, nodes))
        return PassResult(changed=bool(records), layers=records, stats={"folded": len(records)})


def _fold(gm: fx.GraphModule, path: str, nodes: list[fx.Node]) -> LayerRecord:
    module = gm.get_submodule(path)
    kind = get_meta(nodes[0]).reparam.kind
    with torch.no_grad():
        before = module.weight.detach().clone()
        if isinstance(module, QKRLinear):
            linear = nn.Linear(
                module.q.in_features,
                module.num_heads * module.q.in_features,
                bias=False,
                device=before.device,
                dtype=before.dtype,
            )
            linear.weight.copy_(module.product())
            if module.weight_quantizer is not None:
                parametrize.register_parametrization(linear, "weight", module.weight_quantizer)
            parent, _, name = path.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, linear)
            module = linear
        elif parametrize.is_parametrized(module, "weight") and isinstance(
            module.parametrizations.weight[0], REPARAMETRIZATIONS
        ):
            replace_first_parametrization(module, reparam_output(module))
        else:
            raise ReparamError(
                f"fold_reparam: layer '{path}' is annotated '{kind}' but carries no reparameterization to fold"
            )
        after = module.weight.detach()
    clear_annotation(nodes, path, "reparam")
    scale = before.abs().max().item() or 1.0
    diff = (after - before).abs().max().item() / scale
    log.debug("fold_reparam: folded %s (%s), max weight change %.3g of its scale", path, kind, diff)
    return LayerRecord(path, "folded", stats={"kind": kind, "max_rel_weight_diff": diff})


__all__ = ["FoldReparam", "FoldReparamConfig", "REPARAMETRIZATIONS"]
