"""``load_checkpoint``: replace each linear by the packed layer a GPTQ or compressed-tensors checkpoint holds for it.

The checkpoint (`lowbit.interop.checkpoints`) gives every quantized layer's codes, scales, zero points and act-order
groups; the layer is swapped for a `PackedLinear` as a quantizer would (`lowbit.passes.quant.rewrite`), without
re-quantizing, so the backends lower it unchanged. The checkpoint's other tensors (norms, embeddings, biases, float
layers) overwrite the graph's parameters of the same name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from lowbit.errors import PassConfigError
from lowbit.interop import checkpoints
from lowbit.ir.annotations import QuantScheme
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.quant.grid import QuantizedWeight
from lowbit.passes.quant.rewrite import linear_nodes, replace_linear, unsupported_reason
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadCheckpointConfig(PassConfig):
    """Options of the ``load_checkpoint`` pass."""

    path: str = option("", help="(required) GPTQ or compressed-tensors checkpoint directory (safetensors, config.json)")


@register
class LoadCheckpoint(Pass):
    """Packed linears from a quantized checkpoint, codes copied bit for bit."""

    name = "load_checkpoint"
    Config = LoadCheckpointConfig
    stage = "convert"
    produces = frozenset({"quant"})
    forbids = frozenset({"adapter", "reparam", "fake_quant", "sparsity"})
    after_pack = True
    pattern = "nn.Linear"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not self.config.path:
            raise PassConfigError(f"{self.name}: path is required (the checkpoint directory)")
        return apply_checkpoint(gm, checkpoints.read_checkpoint(self.config.path))


def apply_checkpoint(gm: fx.GraphModule, checkpoint: checkpoints.QuantizedCheckpoint) -> PassResult:
    """Check that every layer ``checkpoint`` quantizes fits ``gm``, load its plain tensors into ``gm``, then replace
    those layers (module doc)."""
    nodes = {}
    for node, path, _ in linear_nodes(gm):
        nodes.setdefault(path, node)
    for path, qw in checkpoint.layers.items():
        _check_layer(gm, path, qw, path in nodes)
    loaded = _load_tensors(gm, checkpoint.tensors)
    records = []
    for path, qw in checkpoint.layers.items():
        symmetric = qw.zeros is None
        scheme = QuantScheme(bits=qw.bits, group_size=qw.group_size, symmetric=symmetric, method=checkpoint.format)
        replace_linear(gm, nodes[path], qw, scheme, recompile=False)
        records.append(LayerRecord(path, "quantized", stats={"bits": qw.bits, "group_size": qw.group_size}))
    records += [
        LayerRecord(p, "skipped", "not quantized in the checkpoint") for p in nodes if p not in checkpoint.layers
    ]
    gm.graph.lint()
    gm.recompile()
    log.info("load_checkpoint: %d %s layers, %d tensors loaded", len(checkpoint.layers), checkpoint.format, loaded)
    return PassResult(
        changed=bool(checkpoint.layers),
        layers=records,
        stats={"quantized": len(checkpoint.layers), "tensors": loaded, "format": checkpoint.format},
    )


def _check_layer(gm: fx.GraphModule, path: str, qw: QuantizedWeight, called: bool) -> None:
    """Raise `CheckpointError` unless the packed weight ``qw`` can replace the linear the graph calls at ``path``."""
    if not called:
        raise checkpoints.CheckpointError(
            f"{path}: the checkpoint quantizes this layer, but the graph calls no nn.Linear there"
        )
    reason = unsupported_reason(gm, path)
    if reason is not None:
        raise checkpoints.CheckpointError(f"{path}: the checkpoint's packed weight cannot replace this layer: {reason}")
    shape = tuple(gm.get_submodule(path).weight.shape)
    if (qw.out_features, qw.in_features) != shape:
        raise checkpoints.CheckpointError(
            f"{path}: the checkpoint's weight is {qw.out_features}x{qw.in_features}, the layer's is {shape}"
        )


def _load_tensors(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> int:
    """Copy the checkpoint tensors that name a parameter or buffer of ``gm`` into it, after checking them all; the
    count copied."""
    state = gm.state_dict(keep_vars=True)
    pairs = []
    for name, value in tensors.items():
        target = state.get(name)
        if target is None:
            if name.endswith(".bias") and bool(value.any()):
                raise checkpoints.CheckpointError(f"{name}: a non-zero bias for a layer of the model that has none")
            log.debug("load_checkpoint: %s names no tensor of the graph; left out", name)
        elif tuple(target.shape) != tuple(value.shape):
            raise checkpoints.CheckpointError(
                f"{name}: shape {tuple(value.shape)} in the checkpoint, {tuple(target.shape)} in the model"
            )
        else:
            pairs.append((target, value))
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value.to(target.dtype))
    return len(pairs)


__all__ = ["LoadCheckpoint", "LoadCheckpointConfig", "apply_checkpoint"]
