"""``gptq``: GPTQ weight quantization of every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (Frantar et al. 2022).

The pass moves the calibration batches through the graph with the layers
(`lowbit.passes.quant.hessian.CalibrationCursor`), so each layer's Hessian comes from the
inputs that reach it through the already-quantized layers before it, and every batch runs
through the graph once in all. Layers reading one input node (q/k/v, gate/up) share one
capture, and with equal options are quantized as one weight stacked along the rows, which
gives each the result it would get alone. A convolution is quantized as its weight matrix,
each convolution group's rows with the Hessian of that group's unfolded input patches. The
algorithm itself, single-threaded while the forwards keep torch's threads, is
`lowbit.passes.quant.gptq_algorithm`; docs/methods.md (GPTQ, Convolutions).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from lowbit.errors import LowbitError, PassConfigError
from lowbit.ir.annotations import QuantScheme, get_meta
from lowbit.ir.graph import layers
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import option
from lowbit.passes.quant.gptq_algorithm import GPTQOptions, energy_ratio, gptq_quantize, row_energies
from lowbit.passes.quant.grid import SCALE_DTYPES, QuantizedWeight, quantize_weight, relative_error
from lowbit.passes.quant.hessian import CalibrationCursor, ConvHessianAccumulator, HessianAccumulator
from lowbit.passes.quant.rewrite import ConvGeometry, is_conv, replace_layer, replace_linear, skip_reason, weight_matrix
from lowbit.passes.quant.rtn import RTNConfig
from lowbit.passes.quant.threads import single_thread
from lowbit.passes.registry import register

log = logging.getLogger(__name__)

#: One ``nn.Linear`` or convolution: its first call node, module path and number of call sites.
_Layer = tuple[fx.Node, str, int]


@dataclass(frozen=True)
class GPTQConfig(RTNConfig):
    """Options of the ``gptq`` pass: rtn's grid options (asymmetric by default) plus GPTQ's.

    The defaults are the best settings measured (SmolLM2 perplexity 37.3 at 4 bits, group 64,
    against 43.5 with the plain algorithm): group-aware column order and MSE-fitted grids.
    """

    symmetric: bool = option(False, help="symmetric grid (no stored zero points); GPTQ's default is asymmetric")
    act_order: bool = option(False, help="quantize columns in order of decreasing Hessian diagonal")
    static_groups: bool = option(False, help="group grids from the original weight (no g_idx with act_order)")
    act_group_aware: bool = option(
        True,
        help="groups by their largest Hessian diagonal, columns by theirs "
        "inside each group (GPTQModel's GAR; no g_idx)",
    )
    block_size: int = option(128, min=1, help="columns per lazy-update block (speed only, same result)")
    damp_percent: float = option(0.01, min=0.0, min_exclusive=True, help="damping, as a fraction of mean(diag H)")
    mse: float = option(
        2.4, min=0.0, help="if > 0, shrink each group's range to minimise sum |q - w|^mse; 0 keeps the min/max grid"
    )
    mse_steps: int = option(20, min=1, help="shrink factors 1 - i/mse_steps tried by the mse search")
    mse_max_shrink: float = option(
        0.8, min=0.0, max=1.0, min_exclusive=True, help="largest fraction of a group's range the mse search may cut off"
    )
    divisible_groups: bool = option(
        False,
        help="a group_size that does not divide a layer's input width becomes the largest multiple of 32 below it "
        "that does (no short last group for the kernels to pad)",
    )
    scale_dtype: str = option(
        "float32", choices=tuple(SCALE_DTYPES), help="the values group scales are rounded to (float16: half the bytes)"
    )

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.act_order and self.act_group_aware:
            raise PassConfigError(
                f"{pass_name}: act_order and act_group_aware are two column orders; choose one "
                "(act_group_aware is on by default: set act_group_aware=false with act_order)"
            )

    @property
    def options(self) -> GPTQOptions:
        """The algorithm's settings (`gptq_quantize`) these options stand for."""
        return GPTQOptions(
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            act_order=self.act_order,
            static_groups=self.static_groups,
            act_group_aware=self.act_group_aware,
            block_size=self.block_size,
            damp_percent=self.damp_percent,
            mse=self.mse,
            mse_steps=self.mse_steps,
            mse_max_shrink=self.mse_max_shrink,
            divisible_groups=self.divisible_groups,
            scale_dtype=SCALE_DTYPES[self.scale_dtype],
        )

    def rtn(self, weight: torch.Tensor, name: str) -> QuantizedWeight:
        """Round-to-nearest on the grid these options fit (the baseline GPTQ's errors are compared with)."""
        return quantize_weight(
            weight,
            self.bits,
            self.group_size,
            self.symmetric,
            name=name,
            divisible_groups=self.divisible_groups,
            scale_dtype=SCALE_DTYPES[self.scale_dtype],
        )


@register
class GPTQ(Pass):
    """GPTQ quantization of every linear and convolution not ignored or skipped, using calibration data."""

    name = "gptq"
    Config = GPTQConfig
    stage = "convert"
    requires_calibration = True
    produces = frozenset({"quant"})
    forbids = frozenset({"adapter", "reparam", "fake_quant", "sparsity"})
    after_pack = True
    pattern = "nn.Linear, nn.Conv1d, nn.Conv2d"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cursor = CalibrationCursor(gm, ctx.require_calibration(self.name))
        groups = _input_groups(gm)
        self.bind_layers(gm, [path for group in groups for _, path, _ in group])
        records: list[LayerRecord] = []
        for group in ctx.progress(groups, desc="gptq"):
            records.extend(self._quantize_group(gm, group, cursor))
        gm.graph.lint()
        gm.recompile()
        quantized = sum(r.action == "quantized" for r in records)
        return PassResult(
            changed=quantized > 0,
            layers=records,
            stats={"quantized": quantized, "skipped": len(records) - quantized, "captures": len(groups)},
        )

    def _quantize_group(self, gm: fx.GraphModule, group: list[_Layer], cursor: CalibrationCursor) -> list[LayerRecord]:
        """Capture one Hessian for layers that share an input, then quantize each of them."""
        records: dict[str, LayerRecord] = {}
        todo: list[tuple[_Layer, GPTQConfig]] = []
        for layer in group:
            path = layer[1]
            reason = skip_reason(gm, path, self.config.ignore)
            config = None if reason else self.config_for(path)
            if config is None:
                records[path] = LayerRecord(path, "skipped", reason or "skipped by a per-layer override")
            elif not torch.isfinite(gm.get_submodule(path).weight).all():
                raise LowbitError(f"layer '{path}': weight contains NaN or Inf; it cannot be quantized")
            else:
                todo.append((layer, config))
        if todo and is_conv(gm.get_submodule(todo[0][0][1])):
            (layer, config), path = todo[0], todo[0][0][1]  # a convolution is alone in its group
            records[path] = self._quantize_conv(gm, layer, config, cursor)
        elif todo:
            (_, first, _), _ = todo[0]
            linear = gm.get_submodule(first)
            hessian = HessianAccumulator.empty(first, linear.in_features, linear.weight.device)
            cursor.capture([n for n in gm.graph.nodes if n.op == "call_module" and n.target == first], hessian.add)
            for batch in _stackable(gm, todo):
                if hessian.rows == 0:
                    records.update(
                        (path, LayerRecord(path, "skipped", "it received no calibration inputs"))
                        for (_, path, _), _ in batch
                    )
                else:
                    with single_thread():
                        records.update(self._quantize_layers(gm, batch, hessian.hessian, hessian.rows))
        return [records[path] for _, path, _ in group]

    def _quantize_layers(
        self, gm: fx.GraphModule, batch: list[tuple[_Layer, GPTQConfig]], hessian: torch.Tensor, rows: int
    ) -> dict[str, LayerRecord]:
        """Run GPTQ on layers with one input and config, stacked along the rows (module doc),
        replace each by its packed form and record its statistics."""
        config = batch[0][1]
        paths = [path for (_, path, _), _ in batch]
        weights = [gm.get_submodule(path).weight.detach() for path in paths]
        meta = get_meta(batch[0][0][0])
        pruned = meta is not None and meta.sparsity is not None  # masks applied: keep the zeros they left
        weight, sizes = torch.cat(weights), [w.shape[0] for w in weights]
        stacked = gptq_quantize(
            weight, hessian, config.options, name=", ".join(paths), mask=weight != 0 if pruned else None
        )
        # RTN's grids are per row, so the stacked weight gives every layer its own RTN result.
        rtn = config.rtn(weight, ", ".join(paths))
        energies = row_energies(weight, [stacked.weight, rtn.dequantize()], hessian).split(sizes, dim=1)
        records = {}
        for ((node, path, _), _), w, result, energy in zip(batch, weights, stacked.split(sizes), energies):
            reference, error, rtn_error = energy.sum(dim=1).tolist()
            stats = {
                "bits": config.bits,
                "group_size": result.quantized.group_size,
                "act_order": config.act_order,
                "act_group_aware": config.act_group_aware,
                "samples": rows,
                "damp_percent": result.damp,
                "gptq_loss": result.loss,
                "output_error": energy_ratio(error, reference),
                "rtn_output_error": energy_ratio(rtn_error, reference),
                "rel_error": relative_error(w, result.weight),
            }
            scheme = QuantScheme(
                bits=config.bits, group_size=result.quantized.group_size, symmetric=config.symmetric, method=self.name
            )
            replace_linear(gm, node, result.quantized, scheme, recompile=False)
            log.debug(
                "gptq: %s -> %s, output error %.3g (rtn %.3g)",
                path,
                scheme.describe(),
                stats["output_error"],
                stats["rtn_output_error"],
            )
            records[path] = LayerRecord(path, "quantized", stats=stats)
        return records

    def _quantize_conv(
        self, gm: fx.GraphModule, layer: _Layer, config: GPTQConfig, cursor: CalibrationCursor
    ) -> LayerRecord:
        """GPTQ on each convolution group's rows of the weight matrix with that group's Hessian (module doc)."""
        node, path, _ = layer
        conv = gm.get_submodule(path)
        weight = weight_matrix(conv)
        hessian = ConvHessianAccumulator.empty(path, ConvGeometry.of(conv).args(), weight.shape[1], weight.device)
        cursor.capture([n for n in gm.graph.nodes if n.op == "call_module" and n.target == path], hessian.add)
        if hessian.rows == 0:
            return LayerRecord(path, "skipped", "it received no calibration inputs")
        options = config.options
        if conv.groups > 1 and options.act_order:
            # Each group has its own column order, which one g_idx cannot hold: fit the grids before reordering.
            options = dataclasses.replace(options, static_groups=True)
        meta = get_meta(node)
        pruned = meta is not None and meta.sparsity is not None
        rtn = config.rtn(weight, path).dequantize()
        results, energies = [], torch.zeros(3, dtype=torch.float64)
        with single_thread():
            for rows, rtn_rows, h in zip(weight.chunk(conv.groups), rtn.chunk(conv.groups), hessian.hessian):
                result = gptq_quantize(rows, h, options, name=path, mask=rows != 0 if pruned else None)
                energies += row_energies(rows, [result.weight, rtn_rows], h).sum(dim=1).double().cpu()
                results.append(result)
        qw = _stack([r.quantized for r in results])
        reference, error, rtn_error = energies.tolist()
        stats = {
            "bits": config.bits,
            "group_size": qw.group_size,
            "act_order": config.act_order,
            "act_group_aware": config.act_group_aware,
            "samples": hessian.rows,
            "damp_percent": max(r.damp for r in results),
            "gptq_loss": sum(r.loss for r in results),
            "output_error": energy_ratio(error, reference),
            "rtn_output_error": energy_ratio(rtn_error, reference),
            "rel_error": relative_error(weight, torch.cat([r.weight for r in results])),
        }
        scheme = QuantScheme(bits=config.bits, group_size=qw.group_size, symmetric=config.symmetric, method=self.name)
        replace_layer(gm, node, qw, scheme, recompile=False)
        log.debug("gptq: %s -> %s, output error %.3g (rtn %.3g)", path, scheme.describe(), error, rtn_error)
        return LayerRecord(path, "quantized", stats=stats)


def _stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Quantized row blocks (a convolution's groups, without ``g_idx``, or one block) as one weight."""
    if len(parts) == 1:
        return parts[0]
    zeros = None if parts[0].zeros is None else torch.cat([p.zeros for p in parts])
    return dataclasses.replace(
        parts[0],
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        zeros=zeros,
    )


def _stackable(gm: fx.GraphModule, todo: list[tuple[_Layer, GPTQConfig]]) -> list[list[tuple[_Layer, GPTQConfig]]]:
    """Layers (sharing one input) in runs that GPTQ can quantize as one stacked weight:
    equal configs and weight dtypes; a pruned layer (its mask is its own) runs alone."""

    def key(item: tuple[_Layer, GPTQConfig]) -> Any:
        (node, path, _), config = item
        meta = get_meta(node)
        pruned = meta is not None and meta.sparsity is not None
        return path if pruned else (config, gm.get_submodule(path).weight.dtype)

    runs: list[list[tuple[_Layer, GPTQConfig]]] = []
    for item in todo:
        if runs and key(runs[-1][0]) == key(item):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _input_groups(gm: fx.GraphModule) -> list[list[_Layer]]:
    """The ``nn.Linear`` layers and convolutions in graph order, linears grouped when they are called once on the
    same input (a convolution's Hessian depends on its geometry: it is always alone)."""
    groups: dict[Any, list[_Layer]] = {}
    for path, module, nodes in layers(gm, (nn.Linear, nn.modules.conv._ConvNd)):
        node = nodes[0]
        shares_input = len(nodes) == 1 and len(node.args) == 1 and not node.kwargs and not is_conv(module)
        groups.setdefault(node.args[0] if shares_input else path, []).append((node, path, len(nodes)))
    return list(groups.values())


__all__ = ["GPTQ", "GPTQConfig"]
