"""``fold_batchnorm``: fold each inference-mode BatchNorm into the convolution or linear layer before it.

A BatchNorm that normalizes with its running statistics is a per-channel affine map, so it merges
into the preceding Conv1d/Conv2d (or a Linear followed by BatchNorm1d) exactly: the layer is
replaced by a copy with the scaled weight and shifted bias, and the BatchNorm call is removed
(formula in docs/methods.md). Quantizers then see the weights the model really applies, so the
pass runs before them; the pipeline refuses it after packing. Both tracers keep BatchNorm as a
``call_module`` node (torch.export's inference-mode ``batch_norm`` calls are canonicalized back).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from lowbit.ir.annotations import get_meta
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig
from lowbit.passes.registry import register

#: The layer each BatchNorm kind folds into.
FOLDABLE: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.BatchNorm1d: (nn.Conv1d, nn.Linear),
    nn.BatchNorm2d: (nn.Conv2d,),
}


@dataclass(frozen=True)
class FoldBatchNormConfig(PassConfig):
    """Options of the ``fold_batchnorm`` pass (none)."""


@register
class FoldBatchNorm(Pass):
    """Fold inference-mode BatchNorm1d/2d into the Conv1d/Conv2d/Linear that feeds it (exact).

    BatchNorms that cannot be folded are reported as skipped with the reason; a graph without any
    BatchNorm (a transformer) is left as it is, reporting nothing folded.
    """

    name = "fold_batchnorm"
    Config = FoldBatchNormConfig
    stage = "any"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records = []
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or type(gm.get_submodule(node.target)) not in FOLDABLE:
                continue
            reason = _unfoldable(gm, node)
            if reason:
                records.append(LayerRecord(str(node.target), "skipped", reason))
            else:
                records.append(_fold(gm, node))
        folded = sum(r.action == "folded" for r in records)
        if folded:
            gm.graph.lint()
        return PassResult(changed=bool(folded), layers=records, stats={"folded": folded})


def _unfoldable(gm: fx.GraphModule, node: fx.Node) -> str:
    """Why the BatchNorm call ``node`` cannot be folded into its input layer ("" when it can)."""
    norm = gm.get_submodule(node.target)
    if norm.training:
        return "in training mode (it normalizes with batch statistics)"
    if not norm.track_running_stats or norm.running_mean is None:
        return "tracks no running statistics (it normalizes with batch statistics)"
    source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(source, fx.Node):
        return "its call is not a plain norm(x)"
    meta = get_meta(source)
    if meta is not None and meta.quant is not None:
        return f"its input layer '{meta.layer}' is already packed (quantized): fold BatchNorm before quantization"
    kinds = FOLDABLE[type(norm)]
    if source.op != "call_module" or type(gm.get_submodule(source.target)) not in kinds:
        return f"its input is not a {' or '.join(k.__name__ for k in kinds)} call"
    layer = gm.get_submodule(source.target)
    if len(source.users) > 1:
        return f"the output of '{source.target}' has other users"
    if sum(n.op == "call_module" and n.target == source.target for n in gm.graph.nodes) > 1:
        return f"'{source.target}' is called more than once"
    if meta is not None and meta.kinds():
        return f"'{source.target}' carries {', '.join(sorted(meta.kinds()))} annotations"
    if parametrize.is_parametrized(layer):
        return f"'{source.target}' has parametrized tensors"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != norm.num_features:
        return f"'{source.target}' has {channels} output channels, the norm {norm.num_features}"
    shape = getattr(source.meta.get("tensor_meta"), "shape", None)
    if isinstance(layer, nn.Linear) and (shape is None or len(shape) != 2):
        return f"the norm's channels are not the last dimension of '{source.target}' (a 2-D output)"
    return ""


def _fold(gm: fx.GraphModule, node: fx.Node) -> LayerRecord:
    source = node.args[0]
    path, norm = str(source.target), gm.get_submodule(node.target)
    layer = gm.get_submodule(path)
    folded = copy.deepcopy(layer)  # the module may be shared with other models: never change it in place
    with torch.no_grad():
        weight = layer.weight.double()
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        if norm.affine:
            scale = scale * norm.weight.double()
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
        shift = (bias - norm.running_mean.double()) * scale
        if norm.affine:
            shift = shift + norm.bias.double()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        trainable = layer.weight.requires_grad
        folded.weight = nn.Parameter((weight * scale.reshape(shape)).to(layer.weight.dtype), requires_grad=trainable)
        folded.bias = nn.Parameter(shift.to(layer.weight.dtype), requires_grad=trainable)
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, folded)
    norm_path = str(node.target)
    node.replace_all_uses_with(source)
    gm.graph.erase_node(node)
    if not any(n.op == "call_module" and n.target == norm_path for n in gm.graph.nodes):
        gm.delete_submodule(norm_path)
    return LayerRecord(norm_path, "folded", stats={"into": path})


__all__ = ["FOLDABLE", "FoldBatchNorm", "FoldBatchNormConfig"]
