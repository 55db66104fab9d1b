"""The lowering of a transformed graph to a Relax module: every packed op through its converter.

`lower` imports the graph with the converters of `convert` (packed linears and embeddings) and
`convert_conv` (packed convolutions), records the low-bit layers and announces those on the fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from lowbit import progress
from lowbit.backends.tvm.convert import (
    EMBEDDING_PACKED_NAME,
    LINEAR_PACKED_A8_NAME,
    LINEAR_PACKED_NAME,
    PACKED_LINEARS,
    Lowering,
    PackedEmbeddingConverter,
    PackedLinearConverter,
    announce_fallbacks,
)
from lowbit.backends.tvm.convert_conv import CONV_PACKED_A8_NAME, CONV_PACKED_NAME, PackedConvConverter
from lowbit.backends.tvm.frontend import import_graph, input_specs, symbolic_dims
from lowbit.backends.tvm.inline import inline_wrapped_regions

if TYPE_CHECKING:
    from lowbit.backends.tvm.toolchains import Toolchain

log = logging.getLogger(__name__)


def lower(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    toolchain: Toolchain,
    tuner: Any = None,
    strict: bool = False,
) -> Lowering:
    """Import ``gm`` specialized to the shapes and dtypes of its inputs, symbolic dimensions kept (see
    `frontend.input_specs`).

    ``tuner`` (a `lowbit.backends.tvm.tuning.Tuner`) chooses the knobs of each low-bit
    kernel; without it every kernel uses its hand schedule. Each layer on the fallback is
    logged as a warning with its reason and the nearest supported setting; ``strict``
    raises `UnsupportedLayerError` listing them instead.
    """
    gm = inline_wrapped_regions(gm)
    inputs = input_specs(gm, example_inputs)
    layers = sum(node.op == "call_function" and node.target in PACKED_LINEARS for node in gm.graph.nodes)
    with progress.bar(layers, "low-bit layers") as shown:
        converter = PackedLinearConverter(gm, toolchain, tuner, shown.update)
        conv = PackedConvConverter(gm, converter)
        convert = {
            LINEAR_PACKED_NAME: converter,
            LINEAR_PACKED_A8_NAME: converter,
            EMBEDDING_PACKED_NAME: PackedEmbeddingConverter(gm),
            CONV_PACKED_NAME: conv,
            CONV_PACKED_A8_NAME: conv,
        }
        mod = import_graph(gm, inputs, convert, toolchain.constant_linear)
    lowering = Lowering(mod, toolchain.target, inputs, converter.linears, symbolic_dims(gm))
    announce_fallbacks(lowering.fallbacks, toolchain.name, strict)
    log.info(
        "lowered graph for %s: %d low-bit linear(s), %d on the fp32 fallback",
        toolchain.name,
        len(lowering.linears),
        len(lowering.fallbacks),
    )
    return lowering


__all__ = ["lower"]
