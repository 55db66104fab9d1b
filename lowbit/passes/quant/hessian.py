"""Layer-input Hessians ``H = 2/N · Σ x xᵀ`` captured from calibration forwards.

Used by GPTQ (METHODS.md §8 step 1). `capture_hessian` runs the calibration batches
through the current graph with a forward pre-hook on one ``nn.Linear`` and folds each
batch's inputs into a running ``K × K`` fp32 average, so memory stays bounded by one
batch's activations plus ``H``: activations are never stored. Once the layer has seen
all of its calls in a batch the hook raises a private exception that ends the forward
early, since nothing after the layer is needed.

``N`` counts rows, i.e. tokens: an input of shape ``(..., K)`` contributes
``prod(...)`` rows. (IST-DASLab's code counts sequences; the constant only matters
relative to GPTQ's damping, which is itself relative to ``mean(diag H)``.)
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

Batch = tuple[tuple[Any, ...], dict[str, Any]]


class _StopForward(Exception):
    """Raised by the capture hook once a layer has seen all its inputs of a batch."""


@dataclass
class HessianAccumulator:
    """Running ``H = 2/N · Σ x xᵀ`` over the rows fed to `add` (fp32)."""

    layer: str
    hessian: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, layer: str, in_features: int, device: torch.device) -> "HessianAccumulator":
        return cls(layer, torch.zeros(in_features, in_features, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor) -> None:
        """Fold one input ``(..., K)`` into the average; NaN or Inf raises naming the layer."""
        rows = x.detach().reshape(-1, self.hessian.shape[0]).to(self.hessian)
        if not torch.isfinite(rows).all():
            raise LowbitError(
                f"layer '{self.layer}': its calibration inputs contain NaN or Inf, so its Hessian is undefined; "
                "check the calibration data and the layers before it"
            )
        total = self.rows + rows.shape[0]
        if total == 0:
            return
        self.hessian *= self.rows / total
        rows = rows * (2.0 / total) ** 0.5
        self.hessian += rows.T @ rows
        self.rows = total


def capture_hessian(gm: fx.GraphModule, path: str, calls: int, batches: Iterable[Batch]) -> HessianAccumulator:
    """The input Hessian of the ``nn.Linear`` at ``path``, called ``calls`` times per forward.

    Every batch runs through ``gm`` (as it is now: earlier layers may already be
    quantized) in eval mode without gradients, stopping right after the layer's last call.
    """
    linear = gm.get_submodule(path)
    acc = HessianAccumulator.empty(path, linear.in_features, linear.weight.device)
    seen = 0

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal seen
        acc.add(args[0] if args else kwargs["input"])
        seen += 1
        if seen == calls:
            raise _StopForward

    handle = linear.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), _eval_mode(gm):
            for args, kwargs in batches:
                seen = 0
                with contextlib.suppress(_StopForward):
                    gm(*args, **kwargs)
    finally:
        handle.remove()
    log.debug("captured the input Hessian of %s from %d rows", path, acc.rows)
    return acc


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run calibration in eval mode (no dropout, frozen norms), restoring every submodule's mode after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


__all__ = ["HessianAccumulator", "capture_hessian"]
