"""``prune_channels``: structured pruning that removes output channels and shrinks the graph.

For a Linear (or Conv2d with ``groups=1``) whose output reaches exactly one consumer
Linear/Conv2d through elementwise ops and batch norms, the pass drops the output
channels (rows / filters) with the smallest L1 (or L2) norm (Li et al., "Pruning
Filters for Efficient ConvNets", 2017), keeping ``max(round(c·(1 − s)), 1)`` of ``c``.
The producer, the batch norms in between and the consumer's input channels are all
replaced by smaller modules, so the model computes with smaller dense matrices and
needs no mask. Layers whose outputs feed anything else (residual adds, reshapes,
several consumers, a grouped conv) are skipped with the reason.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lowbit.ir.annotations import Sparsity, annotate
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import option
from lowbit.passes.prune.masks import Layer, PruneConfig, select_layers, summarize
from lowbit.passes.registry import register

log = logging.getLogger(__name__)

#: Modules and functions that act on each channel independently (pass-through for the chain).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.Mish,
    nn.ELU,
    nn.Dropout,
    nn.Identity,
)
ELEMENTWISE_FUNCTIONS = frozenset(
    {
        F.relu,
        F.relu6,
        F.gelu,
        F.silu,
        F.hardswish,
        F.hardsigmoid,
        F.leaky_relu,
        F.mish,
        F.elu,
        F.dropout,
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.nn.functional.sigmoid,
        torch.nn.functional.tanh,
        *(
            getattr(torch.ops.aten, op).default
            for op in (
                "relu",
                "relu6",
                "gelu",
                "silu",
                "hardswish",
                "hardsigmoid",
                "leaky_relu",
                "mish",
                "elu",
                "sigmoid",
                "tanh",
                "dropout",
                "clone",
            )
        ),
    }
)
ELEMENTWISE_METHODS = frozenset({"relu", "sigmoid", "tanh", "contiguous"})
SCALAR_OPS = frozenset(
    {operator.mul, operator.truediv, torch.mul, torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor}
)
NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class ChannelsConfig(PruneConfig):
    """Options of ``prune_channels``; ``sparsity`` is the fraction of output channels removed."""

    criterion: Literal["l1", "l2"] = option("l1", choices=("l1", "l2"), help="channel importance norm")


@dataclass
class Chain:
    """The producer's path to its consumer: batch norms to shrink on the way, then the consumer."""

    norms: list[str]
    consumer: str
    nodes: list[fx.Node]


@register
class PruneChannels(Pass):
    """Remove the weakest output channels of Linear/Conv2d layers and their consumers' inputs."""

    name = "prune_channels"
    Config = ChannelsConfig
    stage = "any"
    pattern = "nn.Linear, nn.Conv2d feeding one consumer"
    forbids = frozenset({"adapter", "reparam", "fake_quant", "sparsity"})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers, records = select_layers(gm, self)
        for layer in layers:
            layer.module = gm.get_submodule(layer.path)  # an earlier shrink may have replaced it as a consumer
            chain, reason = self._chain(gm, layer)
            if chain is None:
                records.append(LayerRecord(layer.path, "skipped", reason))
                log.info("prune_channels: skipping %s: %s", layer.path, reason)
                continue
            records.append(self._shrink(gm, layer, chain))
        gm.graph.lint()
        gm.recompile()
        pruned = [r for r in records if r.action == "pruned"]
        return PassResult(changed=bool(pruned), layers=records, stats=summarize(records))

    def _chain(self, gm: fx.GraphModule, layer: Layer) -> tuple[Chain | None, str]:
        """Follow the producer's output to one consumer through channel-wise ops, or say why not."""
        if len(layer.calls) != 1:
            return None, f"called {len(layer.calls)} times (shared weights)"
        if isinstance(layer.module, nn.Conv2d) and layer.module.groups != 1:
            return None, "grouped convolution"
        node, norms, nodes = layer.calls[0], [], [layer.calls[0]]
        channel_dim = 1 if isinstance(layer.module, nn.Conv2d) else -1
        while True:
            users = list(node.users)
            if len(users) != 1:
                return None, f"'{node.name}' has {len(users)} users; only a single chain to one consumer can shrink"
            node = users[0]
            nodes.append(node)
            if len(node.all_input_nodes) != 1:
                return None, f"'{node.name}' combines several tensors"
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    return self._consumer(gm, layer, node, module, norms, nodes, channel_dim)
                if isinstance(module, NORMS):
                    if channel_dim != 1 and isinstance(module, nn.BatchNorm2d):
                        return None, "a BatchNorm2d after a Linear"
                    norms.append(node.target)
                    continue
                if isinstance(module, ELEMENTWISE_MODULES):
                    continue
                return None, f"its output reaches {type(module).__name__} '{node.target}', which is not channel-wise"
            if node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
                continue
            if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
                continue
            if (
                node.op == "call_function"
                and node.target in SCALAR_OPS
                and not any(isinstance(a, fx.Node) for a in node.args[1:])
            ):
                continue
            return (
                None,
                f"its output reaches '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}), "
                "which is not channel-wise",
            )

    def _consumer(
        self,
        gm: fx.GraphModule,
        layer: Layer,
        node: fx.Node,
        module: nn.Module,
        norms: list[str],
        nodes: list[fx.Node],
        channel_dim: int,
    ) -> tuple[Chain | None, str]:
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return None, f"its consumer '{node.target}' is a grouped convolution"
        if isinstance(module, nn.Linear) != isinstance(layer.module, nn.Linear):
            return None, f"its consumer '{node.target}' is a {type(module).__name__} (channels are on another axis)"
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) != 1:
            return None, f"its consumer '{node.target}' is called more than once"
        if any(n.op == "get_attr" and str(n.target).startswith(node.target + ".") for n in gm.graph.nodes):
            return None, f"its consumer '{node.target}' has parameters read outside its call"
        return Chain(norms, node.target, nodes), ""

    def _shrink(self, gm: fx.GraphModule, layer: Layer, chain: Chain) -> LayerRecord:
        weight = layer.module.weight.detach()
        channels = weight.shape[0]
        config = layer.config
        keep = max(round(channels * (1 - config.sparsity)), 1)
        norm = weight.flatten(1).abs().sum(1) if config.criterion == "l1" else weight.flatten(1).norm(dim=1)
        kept = torch.topk(norm, keep).indices.sort().values
        gm.set_submodule(layer.path, _take_outputs(layer.module, kept))
        for path in chain.norms:
            gm.set_submodule(path, _take_norm(gm.get_submodule(path), kept))
        gm.set_submodule(chain.consumer, _take_inputs(gm.get_submodule(chain.consumer), kept))
        for node in chain.nodes:  # shapes recorded at trace time are stale now
            node.meta.pop("tensor_meta", None)
            node.meta.pop("val", None)
        achieved = 1 - keep / channels
        annotate(
            chain.nodes[0],
            layer.path,
            sparsity=Sparsity(achieved, "channels", "", self.name, target=config.sparsity, merged=True),
        )
        log.debug(
            "prune_channels: %s keeps %d of %d output channels (consumer %s)",
            layer.path,
            keep,
            channels,
            chain.consumer,
        )
        return LayerRecord(
            layer.path,
            "pruned",
            stats={
                "target": config.sparsity,
                "achieved": achieved,
                "params": weight.numel(),
                "pattern": "channels",
                "channels": f"{keep}/{channels}",
                "consumer": chain.consumer,
            },
        )


def _take_outputs(module: nn.Module, kept: torch.Tensor) -> nn.Module:
    """A copy of a Linear/Conv2d keeping only output channels ``kept``."""
    if isinstance(module, nn.Linear):
        new = nn.Linear(module.in_features, len(kept), bias=module.bias is not None)
    else:
        new = _conv_like(module, module.in_channels, len(kept))
    with torch.no_grad():
        new.weight.copy_(module.weight[kept])
        if module.bias is not None:
            new.bias.copy_(module.bias[kept])
    return new.to(module.weight.device, module.weight.dtype).train(module.training)


def _take_inputs(module: nn.Module, kept: torch.Tensor) -> nn.Module:
    """A copy of a Linear/Conv2d keeping only input channels ``kept``."""
    if isinstance(module, nn.Linear):
        new = nn.Linear(len(kept), module.out_features, bias=module.bias is not None)
    else:
        new = _conv_like(module, len(kept), module.out_channels)
    with torch.no_grad():
        new.weight.copy_(module.weight[:, kept])
        if module.bias is not None:
            new.bias.copy_(module.bias)
    return new.to(module.weight.device, module.weight.dtype).train(module.training)


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _take_norm(norm: nn.Module, kept: torch.Tensor) -> nn.Module:
    """A copy of a batch norm keeping only channels ``kept`` (affine parameters and running stats)."""
    new = type(norm)(
        len(kept),
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(norm, name) is not None:
                getattr(new, name).copy_(getattr(norm, name)[kept])
        for name in ("running_mean", "running_var"):
            if getattr(norm, name) is not None:
                getattr(new, name).copy_(getattr(norm, name)[kept])
        if norm.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(norm.num_batches_tracked)
    ref = norm.weight if norm.weight is not None else norm.running_mean
    return new.to(ref.device if ref is not None else "cpu").train(norm.training)


__all__ = ["ChannelsConfig", "PruneChannels"]
