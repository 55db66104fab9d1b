"""``weight_norm``: weight normalization (Salimans & Kingma 2016) of every conv and linear layer.

The weight becomes ``g ⊙ V / ‖V‖`` through torch's own parametrization, so the state-dict
layout is torch's; ``dim="output"`` normalizes per output channel for every layer kind.
``init="weight"`` preserves the function; ``init="data"`` is the paper's data-dependent init
on the first calibration batch, layer after layer in graph order:
docs/methods.md (weight normalization).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.hooks import RemovableHandle

from lowbit.errors import CalibrationError, PassConfigError
from lowbit.ir.annotations import Reparam
from lowbit.ir.graph import layers
from lowbit.ir.variants import fit_batches, run_batch
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.registry import register
from lowbit.passes.reparam.common import (
    CONV_LINEAR,
    ReparamError,
    annotate_calls,
    output_dim,
    skip_reason,
)
from lowbit.passes.selection import matches_any

log = logging.getLogger(__name__)

#: Standard deviation of the random direction ``V`` in the data-dependent init (OpenAI code).
DATA_INIT_STD = 0.05


class ZeroNormError(ReparamError):
    """A weight slice that weight normalization divides by is all zeros, so ``V/‖V‖`` is undefined."""


@dataclass(frozen=True)
class WeightNormConfig(PassConfig):
    """Options of the ``weight_norm`` pass."""

    dim: int | str | None = option(
        "output", help="'output' (per output channel), a weight axis >= 0, or None (whole tensor)"
    )
    init: str = option(
        "weight", choices=("weight", "data"), help="function-preserving init, or the paper's data-dependent init"
    )
    init_scale: float = option(
        1.0, min=0.0, min_exclusive=True, help="target pre-activation std of the data-dependent init"
    )
    ignore: tuple[str, ...] = option((), help="layers left as they are: module paths or glob/re: patterns")

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if isinstance(self.dim, str) and self.dim != "output":
            raise PassConfigError(f"{pass_name}: dim={self.dim!r} is not supported; use 'output', an axis >= 0 or None")
        if isinstance(self.dim, int) and self.dim < 0:
            raise PassConfigError(
                f"{pass_name}: dim={self.dim} is ambiguous (to torch, -1 means the whole tensor, not the last axis); "
                "use an axis >= 0, or None for one norm over the whole tensor"
            )
        if self.init == "data" and self.dim != "output":
            raise PassConfigError(
                f"{pass_name}: init='data' normalizes per unit; it needs dim='output', not dim={self.dim!r}"
            )


@register
class WeightNorm(Pass):
    """Reparameterize conv/linear weights as ``g ⊙ V/‖V‖`` (trainable ``g``, ``V``)."""

    name = "weight_norm"
    Config = WeightNormConfig
    stage = "prepare"
    produces = frozenset({"reparam"})
    forbids = frozenset({"quant", "fake_quant"})
    pattern = "nn.Linear, nn.Conv*, nn.ConvTranspose*"

    def __init__(self, overrides: Any = None, **options: Any) -> None:
        super().__init__(overrides, **options)
        self.requires_calibration = self.config.init == "data"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records, done = [], []
        for path, module, nodes in layers(gm, CONV_LINEAR):
            reason = "ignored" if matches_any(path, self.config.ignore) else skip_reason(gm, path, module)
            config = None if reason else self.config_for(path)
            if config is None:
                records.append(LayerRecord(path, "skipped", reason or "skipped by a per-layer override"))
                continue
            dim = output_dim(module) if config.dim == "output" else config.dim
            _check_dim(path, module.weight, dim)
            if config.init == "weight":
                _check_nonzero(path, module.weight, dim)
            parametrizations.weight_norm(module, "weight", dim=dim)
            annotate_calls(nodes, path, reparam=Reparam("weight_norm", f"dim={dim}, init={config.init}"))
            done.append((path, module, config))
            records.append(LayerRecord(path, "reparameterized", stats={"dim": dim, "init": config.init}))
        if any(config.init == "data" for _, _, config in done):
            _data_init(
                gm, ctx, [(path, module, config.init_scale) for path, module, config in done if config.init == "data"]
            )
        count = len(done)
        log.info("weight_norm: %d layer(s) reparameterized, %d skipped", count, len(records) - count)
        return PassResult(
            changed=count > 0, layers=records, stats={"reparameterized": count, "skipped": len(records) - count}
        )


def _check_dim(path: str, weight: torch.Tensor, dim: int | None) -> None:
    if dim is not None and dim >= weight.dim():
        raise ReparamError(f"weight_norm: layer '{path}' has a {weight.dim()}-D weight; dim={dim} is out of range")


def _check_nonzero(path: str, weight: torch.Tensor, dim: int | None) -> None:
    """Raise `ZeroNormError` naming the channels whose weight slice is all zeros (the norm has no eps)."""
    norms = torch.norm_except_dim(weight.detach(), 2, -1 if dim is None else dim).flatten()
    zero = torch.nonzero(norms == 0).flatten().tolist()
    if zero:
        more = " ..." if len(zero) > 8 else ""
        where = (
            "the whole weight is zero" if dim is None else f"slice(s) {zero[:8]}{more} along dim {dim} are all zeros"
        )
        raise ZeroNormError(
            f"weight_norm: layer '{path}': {where}, so V/‖V‖ is undefined (NaN); "
            "ignore the layer, or use init='data' to start from a random direction"
        )


def _data_init(gm: fx.GraphModule, ctx: PassContext, targets: list[tuple[str, nn.Module, float]]) -> None:
    """The paper's data-dependent init, run on the first calibration batch in one forward.

    Each layer is re-initialized by a forward pre-hook from the input it actually receives, so
    every later layer sees the already re-initialized earlier ones (the paper's layer-by-layer order).
    """
    batches = ctx.require_calibration("weight_norm", "weight_norm: init='data' needs one calibration batch")
    args, kwargs = fit_batches(gm, batches.batches[:1])[0]
    pending: dict[int, RemovableHandle] = {}
    for path, module, init_scale in targets:
        pending[id(module)] = module.register_forward_pre_hook(functools.partial(_init_hook, path, init_scale, pending))
    was_training = gm.training
    try:
        with torch.no_grad():
            run_batch(gm.eval(), args, kwargs)
    finally:
        gm.train(was_training)
        for handle in pending.values():
            handle.remove()
    if pending:
        missing = [path for path, module, _ in targets if id(module) in pending]
        raise CalibrationError(f"weight_norm: init='data': the calibration batch never reached {', '.join(missing)}")


def _init_hook(
    path: str, init_scale: float, pending: dict[int, RemovableHandle], module: nn.Module, inputs: tuple
) -> None:
    """Forward pre-hook: re-initialize ``module`` from its first input, then remove itself."""
    _init_from_batch(path, module, inputs[0], init_scale)
    pending.pop(id(module)).remove()


def _init_from_batch(path: str, module: nn.Module, x: torch.Tensor, init_scale: float) -> None:
    plist = module.parametrizations.weight
    g, v = plist.original0, plist.original1
    v.normal_(0.0, DATA_INIT_STD)
    g.fill_(1.0)
    bias = module.bias
    if bias is not None:
        bias.zero_()
    t = type(module).forward(module, x)  # unit-norm directions, no bias; bypasses this hook
    channel_axis = t.dim() - 1 if isinstance(module, nn.Linear) else 1
    per_unit = t.transpose(channel_axis, -1).reshape(-1, t.shape[channel_axis])
    mean, var = per_unit.mean(0), per_unit.var(0, unbiased=False)
    scale = init_scale / torch.sqrt(var + 1e-10)
    g.copy_(scale.reshape(g.shape))
    if bias is not None:
        bias.copy_(-mean * scale)
    else:
        log.info("weight_norm: %s has no bias, so the data-dependent init leaves its mean uncorrected", path)
    log.debug("weight_norm: data init of %s from a batch of %s", path, tuple(x.shape))


__all__ = ["DATA_INIT_STD", "WeightNorm", "WeightNormConfig", "ZeroNormError"]
