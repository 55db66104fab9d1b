"""Quantization passes. Importing this package registers them (``rtn``, ``gptq``; AWQ and
the ternary/binary quantizers reuse `grid`, `rewrite` and the packed format)."""

from lowbit.passes.quant.gptq import GPTQ, GPTQConfig, gptq_quantize
from lowbit.passes.quant.grid import QuantizedWeight, quantize_weight
from lowbit.passes.quant.rewrite import PackedLinear, linear_nodes, replace_linear
from lowbit.passes.quant.rtn import RTN, RTNConfig

__all__ = [
    "GPTQ",
    "GPTQConfig",
    "PackedLinear",
    "QuantizedWeight",
    "RTN",
    "RTNConfig",
    "gptq_quantize",
    "linear_nodes",
    "quantize_weight",
    "replace_linear",
]
