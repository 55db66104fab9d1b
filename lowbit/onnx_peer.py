"""ONNX Runtime, the engine a user would pick to run a transformer encoder on a CPU, as the demo's peer.

The fp32 model goes through torch's dynamo ONNX exporter, ORT's quantization pre-processing (shape
inference and graph optimization) and ORT's dynamic int8 quantization: int8 weights scaled per output
channel (the setting ORT documents for transformers on CPUs) or per tensor (its default), and int8
activations quantized at run time. Each variant runs in its own session on ``threads`` intra-op threads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class OrtVariant:
    """One ONNX Runtime model of the demo: a key for results, a label for people, and its file."""

    name: str
    label: str
    path: Path


def export(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], directory: Path) -> list[OrtVariant]:
    """Write ``model`` (fp32) and its two dynamic int8 quantizations to ``directory`` as ONNX files."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    directory.mkdir(parents=True, exist_ok=True)
    fp32 = OrtVariant("ort_fp32", "ORT fp32", directory / "fp32.onnx")
    per_channel = OrtVariant("ort_int8", "ORT int8 (per channel)", directory / "int8_per_channel.onnx")
    default = OrtVariant("ort_int8_default", "ORT int8 (default, per tensor)", directory / "int8_default.onnx")
    prepared = directory / "fp32_prepared.onnx"
    with _quiet("onnxscript"), torch.no_grad():
        torch.onnx.export(model, (), str(fp32.path), kwargs=dict(inputs), dynamo=True, verbose=False)
    quant_pre_process(str(fp32.path), str(prepared))
    quantize_dynamic(prepared, per_channel.path, per_channel=True, weight_type=QuantType.QInt8)
    quantize_dynamic(prepared, default.path)
    return [fp32, per_channel, default]


def session(path: Path, inputs: Mapping[str, torch.Tensor], threads: int) -> Callable[[], Any]:
    """A call running the model at ``path`` on ``inputs`` with ``threads`` intra-op threads; it returns the outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    runner = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: np.ascontiguousarray(tensor.numpy()) for name, tensor in inputs.items()}
    return lambda: runner.run(None, feeds)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a library's warnings (the exporter's constant folder reports each subgraph it cannot fold)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
