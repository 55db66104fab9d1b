"""Quantization passes. Importing this package registers them (``rtn``, ``gptq``, ``awq``, ``ternary``,
``binary``, ``quantize_activations``, ``quantize_embeddings``, ``fake_quant``, ``convert_qat``; they share `grid`,
`rewrite` and the packed format, for linears and convolutions alike; `sensitivity` measures per-layer error for
mixed precision)."""

from lowbit.ir import ops_a8  # noqa: F401  (registers lowbit::linear_packed_a8 and its verifier check)
from lowbit.passes.quant.activations import ActivationConfig, PackedConvA8, PackedLinearA8, QuantizeActivations
from lowbit.passes.quant.awq import AWQ, AWQConfig
from lowbit.passes.quant.binary import Binary, BinaryConfig, binary_quantize
from lowbit.passes.quant.convert_qat import ConvertQAT, ConvertQATConfig
from lowbit.passes.quant.embeddings import EmbeddingConfig, PackedEmbedding, QuantizeEmbeddings
from lowbit.passes.quant.gptq import GPTQ, GPTQConfig
from lowbit.passes.quant.gptq_algorithm import GPTQOptions, gptq_quantize
from lowbit.passes.quant.grid import QuantizedWeight, quantize_weight
from lowbit.passes.quant.qat import (
    FakeQuantConfig,
    FakeQuantize,
    WeightFakeQuant,
    attach_latent_clip,
    clip_latent_weights,
)
from lowbit.passes.quant.rewrite import (
    PackedConv,
    PackedLinear,
    layer_nodes,
    linear_nodes,
    replace_layer,
    replace_linear,
)
from lowbit.passes.quant.rtn import RTN, RTNConfig
from lowbit.passes.quant.sensitivity import SensitivityReport, sensitivity
from lowbit.passes.quant.ternary import Ternary, TernaryConfig, ternary_quantize

__all__ = [
    "AWQ",
    "AWQConfig",
    "ActivationConfig",
    "Binary",
    "BinaryConfig",
    "ConvertQAT",
    "ConvertQATConfig",
    "EmbeddingConfig",
    "FakeQuantConfig",
    "FakeQuantize",
    "GPTQ",
    "GPTQConfig",
    "GPTQOptions",
    "PackedConv",
    "PackedConvA8",
    "PackedEmbedding",
    "PackedLinear",
    "PackedLinearA8",
    "QuantizeActivations",
    "QuantizeEmbeddings",
    "QuantizedWeight",
    "RTN",
    "RTNConfig",
    "SensitivityReport",
    "Ternary",
    "TernaryConfig",
    "WeightFakeQuant",
    "attach_latent_clip",
    "binary_quantize",
    "clip_latent_weights",
    "gptq_quantize",
    "layer_nodes",
    "linear_nodes",
    "quantize_weight",
    "replace_layer",
    "replace_linear",
    "sensitivity",
    "ternary_quantize",
]
