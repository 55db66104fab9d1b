"""Quantization passes. Importing this package registers them (``rtn``; GPTQ, AWQ and
the ternary/binary quantizers reuse `grid`, `rewrite` and the packed format)."""

from lowbit.passes.quant.grid import QuantizedWeight, quantize_weight
from lowbit.passes.quant.rewrite import PackedLinear, linear_nodes, replace_linear
from lowbit.passes.quant.rtn import RTN, RTNConfig

__all__ = ["PackedLinear", "QuantizedWeight", "RTN", "RTNConfig", "linear_nodes", "quantize_weight", "replace_linear"]
