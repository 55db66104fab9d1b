"""Helpers shared by the reparameterization passes: finding layers, errors, parametrization plumbing.

Weight normalization, the compander and StatsQ are ``torch.nn.utils.parametrize``
parametrizations of a layer's ``weight``: the layer stays the same ``call_module`` at
the same path (so layer names are stable), its forward computes the weight from the
new trainable tensors every call (so gradients reach them), and parametrizations
stack (a reparameterization first, a fake-quantizer on top).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from lowbit.errors import LowbitError
from lowbit.ir.annotations import annotate, get_meta

log = logging.getLogger(__name__)

#: Layers whose ``weight`` the weight reparameterizations apply to (never norms or embeddings).
CONV_LINEAR: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


class ReparamError(LowbitError):
    """A layer cannot be reparameterized (or folded) as asked; the message names the layer."""


def output_dim(module: nn.Module) -> int:
    """The weight axis that indexes output channels: 1 for transposed convs (``[in, out/g, ...]``), else 0."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def skip_reason(gm: fx.GraphModule, path: str, module: nn.Module) -> str | None:
    """Why the weight of the layer at ``path`` must not be reparameterized, or None."""
    weight = module.weight
    if parametrize.is_parametrized(module, "weight"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations.weight)
        return f"its weight is already parametrized: {kinds}"
    if weight.device.type == "meta":
        return "weight is on the meta device (no data)"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    sharers = [
        name for name, p in gm.named_parameters(remove_duplicate=False) if p is weight and name != f"{path}.weight"
    ]
    if sharers:
        return f"its weight is tied to {', '.join(sharers)}; reparameterizing one side would untie them"
    readers = [n.name for n in gm.graph.nodes if n.op == "get_attr" and n.target == f"{path}.weight"]
    if readers:
        return f"its weight is also read outside the layer call (nodes {', '.join(readers)})"
    return None


def annotate_calls(nodes: list[fx.Node], path: str, **fields: object) -> None:
    for node in nodes:
        annotate(node, path, **fields)


def clear_annotation(nodes: list[fx.Node], path: str, kind: str) -> None:
    """Drop the ``kind`` annotation from the call nodes of ``path`` (after folding it away)."""
    for node in nodes:
        if get_meta(node) is not None:
            annotate(node, path, **{kind: None})


def parametrization_inputs(module: nn.Module, name: str = "weight") -> list[torch.Tensor]:
    """The original tensors a parametrized ``name`` is computed from (``original`` or ``original0..n``)."""
    plist = module.parametrizations[name]
    if plist.is_tensor:
        return [plist.original]
    return [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


def reparam_output(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor the first parametrization of ``name`` computes (the reparameterized, not yet fake-quantized,
    weight)."""
    plist = module.parametrizations[name]
    return plist[0](*parametrization_inputs(module, name))


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its parametrized class.

    torch injects one ``Parametrized<Layer>`` class per module, ``copy.deepcopy`` shares it
    between the copies, and removing a parametrization deletes the property from that
    class, which would break every other copy (e.g. the graph a pipeline copied from).
    """
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def replace_first_parametrization(module: nn.Module, value: torch.Tensor, name: str = "weight") -> None:
    """Replace the first parametrization of ``name`` (and its originals) by the plain tensor ``value``.

    Parametrizations stacked on top of it (a fake-quantizer) are re-registered on the new plain
    tensor, so the layer computes exactly what it computed before.
    """
    rest = list(module.parametrizations[name])[1:]
    requires_grad = any(t.requires_grad for t in parametrization_inputs(module, name))
    _own_class(module)
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=requires_grad))
    for p in rest:
        parametrize.register_parametrization(module, name, p)


__all__ = [
    "CONV_LINEAR",
    "ReparamError",
    "annotate_calls",
    "clear_annotation",
    "output_dim",
    "parametrization_inputs",
    "reparam_output",
    "replace_first_parametrization",
    "skip_reason",
]
