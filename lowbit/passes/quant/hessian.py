"""Layer-input Hessians ``H = 2/N · Σ x xᵀ`` captured from calibration forwards (GPTQ and AWQ).

`capture_hessian` runs the calibration batches through the current graph with a forward
pre-hook on one ``nn.Linear``, folds each batch into a running fp32 ``K × K`` average and
stops the forward once the layer has seen all its calls, so activations are never stored.
`capture_inputs` hands the inputs to any consumer; `CalibrationCursor` advances the batches
through the graph with a pass that calibrates layer after layer, so all layers together cost
one forward per batch. ``N`` counts token rows; padded tokens (`lowbit.calibration.padding_mask`)
are left out, since the model never reads them. Batches go through the graph as `lowbit.ir.variants.fit_batches`
fits them: a graph specialized to the example's shapes runs other shapes with the constants of a trace at that
shape (`lowbit.ir.variants.ShapeVariant`), or batches cut to its batch size: the statistics are those of the
batches as given. A convolution's Hessians (`ConvHessianAccumulator`, one per
convolution group) come from its unfolded input patches. The math: docs/methods.md (GPTQ, Convolutions).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from lowbit.calibration import padding_mask
from lowbit.errors import LowbitError
from lowbit.ir.ops_conv import unfold_patches
from lowbit.ir.variants import Signature, fit_batches, interpreter, run_batch, signature

log = logging.getLogger(__name__)

Batch = tuple[tuple[Any, ...], dict[str, Any]]
#: Receives one captured input and its batch's padding mask (True = real token) or None.
Consumer = Callable[[torch.Tensor, "torch.Tensor | None"], None]


def token_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``(..., K)`` as rows ``(n, K)``, without the padded tokens when ``keep``
    ``(batch, tokens)`` matches ``x``'s leading dimensions (module doc)."""
    if keep is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(keep.shape):
        return x[keep.to(x.device)]
    return x.reshape(-1, x.shape[-1])


class _StopForward(Exception):
    """Raised by the capture hook once a layer has seen all its inputs of a batch."""


@dataclass
class HessianAccumulator:
    """Running ``H = 2/N · Σ x xᵀ`` over the rows fed to `add` (fp32)."""

    layer: str
    hessian: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, layer: str, in_features: int, device: torch.device) -> HessianAccumulator:
        return cls(layer, torch.zeros(in_features, in_features, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fold one input ``(..., K)`` into the average, without padded tokens (`token_rows`);
        NaN or Inf raises naming the layer.

        A non-finite input makes its column's ``H_jj = Σ x_j²`` non-finite, so checking
        the diagonal after the update is enough and costs ``K`` instead of ``rows · K``.
        """
        rows = token_rows(x.detach(), keep).to(self.hessian)
        total = self.rows + rows.shape[0]
        if total == 0:
            return
        self.hessian.addmm_(rows.T, rows, beta=self.rows / total, alpha=2.0 / total)
        self.rows = total
        if not torch.isfinite(self.hessian.diagonal()).all():
            raise LowbitError(
                f"layer '{self.layer}': its calibration inputs contain NaN or Inf (or overflow float32), so its "
                "Hessian is undefined; check the calibration data and the layers before it"
            )


@dataclass
class ConvHessianAccumulator:
    """Running per-group Hessians of a convolution's unfolded input, ``H_g = 2/N · Σ p pᵀ`` ``(groups, K, K)``
    over the ``N`` patches ``p`` of each convolution group (docs/methods.md (Convolutions)).

    ``geometry`` is the op's ``(kernel_size, stride, padding, dilation, groups)``; ``rows`` counts patches.
    """

    layer: str
    geometry: tuple[list[int], list[int], list[int], list[int], int]
    hessian: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(
        cls,
        layer: str,
        geometry: tuple[list[int], list[int], list[int], list[int], int],
        width: int,
        device: torch.device,
    ) -> ConvHessianAccumulator:
        return cls(layer, geometry, torch.zeros(geometry[-1], width, width, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fold the patches of one input ``(B, C_in, *spatial)`` into the averages; NaN or Inf raises naming the
        layer. ``keep`` is ignored: a convolution reads every position."""
        patches, _ = unfold_patches(x.detach().to(self.hessian), *self.geometry)
        total = self.rows + patches.shape[1]
        if total == 0:
            return
        self.hessian.baddbmm_(patches.transpose(1, 2), patches, beta=self.rows / total, alpha=2.0 / total)
        self.rows = total
        if not torch.isfinite(self.hessian.diagonal(dim1=1, dim2=2)).all():
            raise LowbitError(
                f"layer '{self.layer}': its calibration inputs contain NaN or Inf (or overflow float32), so its "
                "Hessian is undefined; check the calibration data and the layers before it"
            )


def capture_hessian(gm: fx.GraphModule, path: str, calls: int, batches: Iterable[Batch]) -> HessianAccumulator:
    """The input Hessian of the ``nn.Linear`` at ``path``, called ``calls`` times per forward.

    Every batch runs through ``gm`` (as it is now: earlier layers may already be
    quantized) in eval mode without gradients, stopping right after the layer's last call.
    """
    linear = gm.get_submodule(path)
    acc = HessianAccumulator.empty(path, linear.in_features, linear.weight.device)
    capture_inputs(gm, path, calls, batches, acc.add)
    log.debug("captured the input Hessian of %s from %d rows", path, acc.rows)
    return acc


def capture_inputs(gm: fx.GraphModule, path: str, calls: int, batches: Iterable[Batch], consume: Consumer) -> None:
    """Feed every input of the submodule at ``path`` (called ``calls`` times per forward), with
    its batch's padding mask, to ``consume``.

    Batches run through ``gm`` in eval mode without gradients, each stopping right after
    the submodule's last call; inputs are handed over one at a time and never stored here.
    """
    module = gm.get_submodule(path)
    seen, keep = 0, None

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal seen
        consume(args[0] if args else kwargs["input"], keep)
        seen += 1
        if seen == calls:
            raise _StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), _eval_mode(gm):
            for args, kwargs in fit_batches(gm, batches):
                seen, keep = 0, padding_mask(args, kwargs)
                with contextlib.suppress(_StopForward):
                    run_batch(gm, args, kwargs)
    finally:
        handle.remove()


class CalibrationCursor:
    """Every calibration batch paused at one point of the graph, holding only the live values.

    A pass that calibrates layers in graph order asks for each layer's inputs in turn:
    `capture` runs all batches from where they stopped up to the layer's first call,
    keeping only the values that nodes further on still read, and hands the layer's
    inputs over. The calibration then costs about one forward of the graph in all,
    instead of one per layer, and memory is bounded by the values crossing the current
    point (for a transformer: the residual stream and the attention's operands) times
    the batches, never every activation of the model.

    The batches see the graph as it is when they pass each node: a layer quantized
    before the cursor reaches it computes its quantized output for every later capture
    (GPTQ's "propagate quantized outputs"). Nodes behind the cursor must not be
    rewritten; nodes ahead of it may be.
    """

    def __init__(self, gm: fx.GraphModule, batches: Iterable[Batch]) -> None:
        from lowbit.ir.trace import graph_inputs

        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        batches = fit_batches(gm, batches)
        shared: dict[Signature, fx.Interpreter] = {}  # one interpreter per input shape
        for args, kwargs in batches:
            shape = signature(gm, args, kwargs)
            if shape not in shared:
                shared[shape] = interpreter(gm, args, kwargs)
        self._interpreters = [shared[signature(gm, args, kwargs)] for args, kwargs in batches]
        self._envs = [dict(zip(placeholders, graph_inputs(gm, args, kwargs))) for args, kwargs in batches]
        self._masks = [padding_mask(args, kwargs) for args, kwargs in batches]
        self._done: set[fx.Node] = set(placeholders)

    def capture(self, calls: list[fx.Node], consume: Consumer) -> None:
        """Feed the input of every call node in ``calls`` (one module's calls, in graph order),
        with its batch's padding mask, to ``consume``.

        The cursor moves to the first call. Inputs of later calls of the same module are
        computed on a scratch copy of each batch's values, one batch at a time.
        """
        with torch.no_grad(), _eval_mode(self.gm):
            self._advance(calls[0])
            pending = set(calls)
            for env, keep, runner in zip(self._envs, self._masks, self._interpreters):
                scratch = dict(env)
                for node in self._ahead():
                    if node in pending:
                        consume(scratch[_call_input(node)], keep)
                        if node is calls[-1]:
                            break
                    scratch[node] = _run(runner, node, scratch)

    def update(self, node: fx.Node, change: Callable[[Any], Any]) -> None:
        """Replace ``node``'s held value in every batch by ``change(value)``.

        For a pass that changes the graph behind the cursor in a way whose effect it knows
        (AWQ folding ``1/s`` into the op that produces a held input); ``node`` must be
        held, i.e. read by a node ahead of the cursor.
        """
        for env in self._envs:
            if node not in env:
                raise LowbitError(f"node '{node.name}' is not held by the calibration cursor")
            env[node] = change(env[node])

    def _ahead(self) -> Iterator[fx.Node]:
        """The nodes not run yet, in graph order."""
        return (n for n in self.gm.graph.nodes if n not in self._done)

    def _advance(self, stop: fx.Node) -> None:
        """Run every batch up to (not including) ``stop``, dropping values no node ahead reads."""
        for node in list(self._ahead()):
            if node is stop:
                return
            for env, runner in zip(self._envs, self._interpreters):
                env[node] = _run(runner, node, env)
            self._done.add(node)
            for value in [*node.all_input_nodes, node]:
                if all(user in self._done for user in value.users):
                    for env in self._envs:
                        env.pop(value, None)
        raise LowbitError(f"node '{stop.name}' is not ahead of the calibration cursor")


def _run(runner: fx.Interpreter, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    runner.env = env
    return runner.run_node(node)


def _call_input(node: fx.Node) -> fx.Node:
    """The node a module call reads its (first) input from."""
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


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


__all__ = [
    "CalibrationCursor",
    "Consumer",
    "ConvHessianAccumulator",
    "HessianAccumulator",
    "capture_hessian",
    "capture_inputs",
    "token_rows",
]
