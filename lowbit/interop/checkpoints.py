"""Quantized checkpoints of other tools read into lowbit's packed format, and lowbit's written as compressed-tensors.

Two safetensors layouts map onto the packed format (`lowbit.ir.packing`) without re-quantizing: GPTQ (AutoGPTQ and
GPTQModel ``gptq`` format: ``qweight``/``qzeros`` int32 words packed along the input and output dimension,
``scales``, ``g_idx``; zero points stored minus one unless ``checkpoint_format`` is ``gptq_v2``) and
compressed-tensors ``pack-quantized`` (``weight_packed`` rows, ``weight_scale``, ``weight_zero_point`` packed along
the output dimension, ``weight_shape``, optional ``weight_g_idx``). Both pack codes LSB-first into little-endian
int32 words, which is lowbit's byte stream read four bytes at a time, so codes are copied bit for bit and scales
widened to float32 exactly. A tensor whose layout, bit width or grid lowbit cannot hold is refused by name
(`CheckpointError`); an export is written aside and renamed into place, whole or not at all.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.operator_schemas import normalize_function

from lowbit.errors import LowbitError
from lowbit.ir import ops, packing
from lowbit.ir.annotations import packed_layer
from lowbit.ir.graph import get_attr
from lowbit.passes.quant.grid import QuantizedWeight

log = logging.getLogger(__name__)

#: Float dtypes a checkpoint's scales and plain tensors may have (each widens to float32 exactly).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Tensor name suffixes of one quantized layer, per format.
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
CT_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
#: compressed-tensors weight strategies lowbit's per-row groups hold.
CT_STRATEGIES = ("group", "channel")


class CheckpointError(LowbitError, ValueError):
    """A checkpoint tensor or setting that lowbit's packed format cannot represent, or a file that is incomplete."""


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """A checkpoint read into lowbit's terms: the packed layers by module path, and every other tensor by name."""

    format: str
    layers: dict[str, QuantizedWeight]
    tensors: dict[str, torch.Tensor]


def read_checkpoint(
    source: str | Path | Mapping[str, torch.Tensor], quantization_config: Mapping[str, Any] | None = None
) -> QuantizedCheckpoint:
    """Read a GPTQ or compressed-tensors checkpoint: a directory of safetensors files with ``config.json`` (or
    GPTQ's ``quantize_config.json``), or a state dict with its ``quantization_config``."""
    if isinstance(source, Mapping):
        tensors = dict(source)
        if quantization_config is None:
            raise CheckpointError("a checkpoint given as a state dict needs its quantization_config")
    else:
        tensors = _read_tensors(Path(source))
        quantization_config = quantization_config or _read_quantization_config(Path(source))
    method = str(quantization_config.get("quant_method", "gptq")).lower()
    if method == "gptq":
        return _read_gptq(tensors, quantization_config)
    if method == "compressed-tensors":
        return _read_compressed_tensors(tensors, quantization_config)
    raise CheckpointError(
        f"quant_method {method!r} is not a checkpoint format lowbit reads ('gptq', 'compressed-tensors')"
    )


def export_compressed_tensors(
    model: Any,
    directory: str | Path,
    *,
    config: Any = None,
    scale_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write the packed linears of ``model`` (a compiled model holding its graph, or the graph) as a
    compressed-tensors ``pack-quantized`` checkpoint: ``model.safetensors`` and ``config.json`` (``config``, e.g. the
    transformers config, with its ``quantization_config``). Scales are written in ``scale_dtype`` only where that
    is exact."""
    graph = model if isinstance(model, fx.GraphModule) else getattr(model, "graph", None)
    if not isinstance(graph, fx.GraphModule):
        raise CheckpointError("compressed-tensors export reads the transformed graph, which this model does not hold")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise CheckpointError(f"{directory} already exists and is not empty; pass overwrite=True to replace it")
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[tuple[int, str, int | None, bool], list[str]] = {}
    owned: set[str] = set()
    for path, (arguments, attributes) in packed_linears(graph).items():
        layer, scheme = _encode_layer(path, arguments, scale_dtype)
        tensors.update(layer)
        schemes.setdefault(scheme, []).append(path)
        owned.update(attributes)
    tensors.update(_plain_tensors(graph, owned))
    quantization = _ct_config(schemes, _float_linears(graph))
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    settings["quantization_config"] = quantization
    return _publish(directory, tensors, settings)


def packed_linears(graph: fx.GraphModule) -> dict[str, tuple[dict[str, Any], set[str]]]:
    """Every ``linear_packed`` call of ``graph`` by layer path: its constant arguments and the attributes it reads."""
    layers = {}
    for node in graph.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith("lowbit."):
            continue
        if node.target is not ops.linear_packed:
            raise CheckpointError(
                f"node '{node.name}' calls {node.target}: compressed-tensors pack-quantized describes weight-only "
                "linears (int8 activations, packed embeddings and convolutions have no form there)"
            )
        kwargs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        attributes = {str(v.target) for k, v in kwargs.items() if k != "x" and isinstance(v, fx.Node)}
        arguments = {k: get_attr(graph, v) if isinstance(v, fx.Node) else v for k, v in kwargs.items() if k != "x"}
        layers[packed_layer(node, kwargs["qweight"])] = (arguments, attributes)
    return layers


def words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """Rows of int32 words ``(R, W)`` as their little-endian bytes ``(R, 4·W)`` (uint8)."""
    array = np.ascontiguousarray(words.detach().cpu().numpy().astype("<i4", copy=False))
    return torch.from_numpy(array.view(np.uint8).reshape(words.shape[0], -1).copy())


def bytes_to_words(data: torch.Tensor) -> torch.Tensor:
    """Rows of bytes ``(R, B)`` as little-endian int32 words ``(R, ceil(B/4))``, the last one zero-padded."""
    padded = torch.nn.functional.pad(data, (0, -data.shape[1] % 4)).contiguous().numpy()
    return torch.from_numpy(padded.view("<i4").astype(np.int32))


def unpack_words(words: torch.Tensor, bits: int, count: int, name: str) -> torch.Tensor:
    """The ``count`` codes per row of int32 words packed LSB-first, as uint8 ``(R, count)``."""
    _check_bits(bits, name)
    needed = -(-count * bits // 32)
    if words.shape[1] != needed:
        raise CheckpointError(f"{name}: {words.shape[1]} int32 words per row; {count} {bits}-bit codes take {needed}")
    data = words_to_bytes(words)[:, : packing.packed_row_bytes(count, bits)]
    return packing.unpack(data, bits, count)


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `unpack_words`: uint8 codes ``(R, K)`` packed LSB-first into int32 words ``(R, ceil(K·bits/32))``."""
    return bytes_to_words(packing.pack(codes.contiguous(), bits))


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors file to read")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except SafetensorError as error:
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from error
    return tensors


def _read_quantization_config(directory: Path) -> dict[str, Any]:
    config_file, gptq_file = directory / "config.json", directory / "quantize_config.json"
    if config_file.is_file():
        quantization = _read_json(config_file).get("quantization_config")
        if quantization is not None:
            return quantization
    if gptq_file.is_file():
        return {"quant_method": "gptq", **_read_json(gptq_file)}
    raise CheckpointError(f"{directory}: neither config.json's quantization_config nor quantize_config.json is present")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_gptq(tensors: dict[str, torch.Tensor], settings: Mapping[str, Any]) -> QuantizedCheckpoint:
    bits = int(settings.get("bits", 4))
    group_size = int(settings.get("group_size", 128))
    symmetric = bool(settings.get("sym", True))
    layout = str(settings.get("checkpoint_format", settings.get("format", "gptq"))).lower()
    if layout not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"GPTQ checkpoint_format {layout!r}: lowbit reads 'gptq' and 'gptq_v2'")
    zero_offset = 1 if layout == "gptq" else 0
    paths = sorted(name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight"))
    layers = {path: _gptq_layer(path, tensors, bits, group_size, symmetric, zero_offset) for path in paths}
    rest = _remaining(tensors, paths, GPTQ_TENSORS)
    return QuantizedCheckpoint("gptq", layers, rest)


def _gptq_layer(
    path: str, tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool, zero_offset: int
) -> QuantizedWeight:
    qweight = _tensor(tensors, f"{path}.qweight", (torch.int32,), 2)
    qzeros = _tensor(tensors, f"{path}.qzeros", (torch.int32,), 2)
    scales = _tensor(tensors, f"{path}.scales", FLOAT_DTYPES, 2)
    _check_bits(bits, f"{path}.qweight")
    words, out_features = qweight.shape
    if words * 32 % bits:
        raise CheckpointError(
            f"{path}.qweight: {words} rows of int32 words do not hold a whole number of {bits}-bit codes"
        )
    in_features = words * 32 // bits
    group = _group_size(group_size, in_features, f"{path}.qweight")
    groups = packing.num_groups(in_features, group)
    _check_shape(scales, (groups, out_features), f"{path}.scales", f"{groups} groups x {out_features} outputs")
    codes = unpack_words(qweight.T, bits, in_features, f"{path}.qweight")
    stored = unpack_words(qzeros, bits, out_features, f"{path}.qzeros")
    _check_shape(stored, (groups, out_features), f"{path}.qzeros", f"{groups} groups")
    zeros = stored.T.to(torch.float32) + zero_offset
    if symmetric and bool((zeros == packing.default_zero(bits)).all()):
        zeros = None
    g_idx = _g_idx(tensors.get(f"{path}.g_idx"), in_features, group, f"{path}.g_idx")
    weight = scales.T.to(torch.float32).contiguous()
    return QuantizedWeight(codes, weight, None if zeros is None else zeros.contiguous(), g_idx, bits, group)


def _read_compressed_tensors(tensors: dict[str, torch.Tensor], settings: Mapping[str, Any]) -> QuantizedCheckpoint:
    groups = settings.get("config_groups") or {}
    default_format = settings.get("format")
    paths = sorted(name.removesuffix(".weight_packed") for name in tensors if name.endswith(".weight_packed"))
    layers = {}
    for path in paths:
        scheme = _ct_scheme(path, groups)
        layout = scheme.get("format") or default_format
        if layout != "pack-quantized":
            raise CheckpointError(
                f"{path}.weight_packed: compressed-tensors format {layout!r}; lowbit reads 'pack-quantized'"
            )
        layers[path] = _ct_layer(path, tensors, scheme)
    unpacked = [
        name for name in tensors if name.endswith(".weight") and tensors[name].dtype in (torch.int8, torch.int32)
    ]
    if unpacked:
        raise CheckpointError(f"{unpacked[0]}: integer weights that are not packed ('int-quantized'); lowbit reads "
                              "'pack-quantized'")  # fmt: skip
    return QuantizedCheckpoint("compressed-tensors", layers, _remaining(tensors, paths, CT_TENSORS))


def _ct_scheme(path: str, groups: Mapping[str, Any]) -> dict[str, Any]:
    """The config group whose targets match the layer at ``path`` (a class name, the path, or ``re:`` pattern)."""
    for scheme in groups.values():
        for target in scheme.get("targets", ()):
            if target in ("Linear", path) or (target.startswith("re:") and re.match(target[3:], path)):
                return dict(scheme)
    raise CheckpointError(f"{path}.weight_packed: no config group of quantization_config targets this layer")


def _ct_layer(path: str, tensors: dict[str, torch.Tensor], scheme: Mapping[str, Any]) -> QuantizedWeight:
    name = f"{path}.weight_packed"
    weights = scheme.get("weights") or {}
    activations = scheme.get("input_activations")
    if activations:
        raise CheckpointError(f"{name}: the scheme also quantizes input activations; lowbit reads weight-only schemes")
    bits = int(weights.get("num_bits", 8))
    strategy = str(weights.get("strategy", "group"))
    if weights.get("type", "int") != "int":
        raise CheckpointError(f"{name}: {weights.get('type')!r} weights; lowbit's packed codes are integers")
    if strategy not in CT_STRATEGIES:
        raise CheckpointError(f"{name}: strategy {strategy!r}; lowbit holds per-row scales: 'group' or 'channel'")
    _check_bits(bits, name)
    packed = _tensor(tensors, name, (torch.int32,), 2)
    shape = _tensor(tensors, f"{path}.weight_shape", (torch.int32, torch.int64), 1)
    if shape.numel() != 2:
        raise CheckpointError(f"{path}.weight_shape: expected (out, in), got {shape.tolist()}")
    out_features, in_features = (int(v) for v in shape)
    if packed.shape[0] != out_features:
        raise CheckpointError(f"{name}: {packed.shape[0]} rows, weight_shape says {out_features}")
    group = (
        in_features if strategy == "channel" else _group_size(int(weights.get("group_size") or -1), in_features, name)
    )
    groups = packing.num_groups(in_features, group)
    codes = unpack_words(packed, bits, in_features, name)
    scale = _tensor(tensors, f"{path}.weight_scale", FLOAT_DTYPES, 2)
    _check_shape(scale, (out_features, groups), f"{path}.weight_scale", f"{out_features} outputs x {groups} groups")
    offset = 1 << (bits - 1)
    if weights.get("symmetric", True):
        zeros = None if packing.default_zero(bits) == offset else torch.full((out_features, groups), float(offset))
    else:
        zeros = _ct_zeros(tensors, f"{path}.weight_zero_point", bits, out_features, groups)
    g_idx = _g_idx(tensors.get(f"{path}.weight_g_idx"), in_features, group, f"{path}.weight_g_idx")
    return QuantizedWeight(codes, scale.to(torch.float32).contiguous(), zeros, g_idx, bits, group)


def _ct_zeros(tensors: dict[str, torch.Tensor], name: str, bits: int, rows: int, groups: int) -> torch.Tensor:
    """Asymmetric zero points, packed along the output dimension (int32) or one signed int8 per entry."""
    stored = _tensor(tensors, name, (torch.int32, torch.int8), 2)
    if stored.dtype == torch.int8:
        _check_shape(stored, (rows, groups), name, f"{rows} outputs x {groups} groups")
        return stored.to(torch.float32) + (1 << (bits - 1))
    codes = unpack_words(stored.T, bits, rows, name)
    _check_shape(codes, (groups, rows), name, f"{groups} groups")
    return codes.T.to(torch.float32).contiguous()


def _encode_layer(
    path: str, arguments: Mapping[str, Any], scale_dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], tuple[int, str, int | None, bool]]:
    """The compressed-tensors tensors of one packed linear, and its scheme (bits, strategy, group size, symmetric)."""
    bits, group, in_features = arguments["bits"], arguments["group_size"], arguments["in_features"]
    qweight, scales, zeros, g_idx = (arguments[k] for k in ("qweight", "scales", "zeros", "g_idx"))
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group):
        raise CheckpointError(f"layer '{path}': act-order column groups (g_idx) have no compressed-tensors "
                              "pack-quantized form (its 'group' activation ordering was removed)")  # fmt: skip
    channel = group == in_features
    if not channel and in_features % group:
        raise CheckpointError(f"layer '{path}': group_size {group} does not divide in_features {in_features}, which "
                              "compressed-tensors groups require")  # fmt: skip
    offset = 1 << (bits - 1)
    if zeros is None and packing.default_zero(bits) != offset:
        raise CheckpointError(f"layer '{path}': {bits}-bit codes centred on {packing.default_zero(bits)} have no "
                              "compressed-tensors form (its symmetric zero point is an integer)")  # fmt: skip
    scale = scales.to(scale_dtype)
    if not torch.equal(scale.to(torch.float32), scales):
        raise CheckpointError(f"layer '{path}': its scales are not exact in {scale_dtype}; export in float32")
    tensors = {
        f"{path}.weight_packed": bytes_to_words(qweight.detach().cpu()),
        f"{path}.weight_scale": scale.detach().cpu().contiguous(),
        f"{path}.weight_shape": torch.tensor([qweight.shape[0], in_features], dtype=torch.int64),
    }
    if zeros is not None:
        if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() >= 1 << bits:
            raise CheckpointError(f"layer '{path}': zero points that are not {bits}-bit integers have no "
                                  "compressed-tensors form")  # fmt: skip
        tensors[f"{path}.weight_zero_point"] = pack_words(zeros.T.to(torch.uint8), bits).T.contiguous()
    bias = arguments.get("bias")
    if bias is not None:
        tensors[f"{path}.bias"] = bias.detach().cpu().contiguous()
    return tensors, (bits, "channel" if channel else "group", None if channel else group, zeros is None)


def _ct_config(schemes: Mapping[tuple[int, str, int | None, bool], list[str]], ignore: list[str]) -> dict[str, Any]:
    groups = {
        f"group_{index}": {
            "targets": sorted(paths),
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": symmetric,
                "strategy": strategy,
                "group_size": group,
                "dynamic": False,
                "actorder": None,
            },  # fmt: skip
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
        for index, ((bits, strategy, group, symmetric), paths) in enumerate(sorted(schemes.items(), key=str))
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }


def _plain_tensors(graph: fx.GraphModule, owned: set[str]) -> dict[str, torch.Tensor]:
    """The graph's parameters and buffers that no packed linear reads (`packed_linears` refused other packed ops)."""
    return {name: value.detach().cpu().contiguous() for name, value in graph.state_dict().items() if name not in owned}


def _float_linears(graph: fx.GraphModule) -> list[str]:
    return [name for name, module in graph.named_modules() if type(module) is nn.Linear]


def _publish(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write the checkpoint into a temporary sibling of ``directory`` and rename it into place."""
    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_file({k: v.clone() for k, v in tensors.items()}, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s: %d tensors", directory, len(tensors))
    return directory


def _remaining(tensors: Mapping[str, torch.Tensor], paths: list[str], suffixes: tuple[str, ...]) -> dict[str, Any]:
    owned = {f"{path}.{suffix}" for path in paths for suffix in suffixes}
    return {name: value for name, value in tensors.items() if name not in owned}


def _tensor(tensors: Mapping[str, torch.Tensor], name: str, dtypes: tuple[torch.dtype, ...], dim: int) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"{name}: missing from the checkpoint")
    tensor = tensors[name]
    if tensor.dtype not in dtypes or tensor.dim() != dim:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CheckpointError(f"{name}: expected a {dim}-D {allowed} tensor, got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...], name: str, what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {shape} ({what})")


def _check_bits(bits: int, name: str) -> None:
    if bits not in packing.SUPPORTED_BITS:
        raise CheckpointError(f"{name}: {bits}-bit codes; lowbit's packed format holds "
                              f"{', '.join(map(str, packing.SUPPORTED_BITS))}-bit codes")  # fmt: skip


def _group_size(group_size: int, in_features: int, name: str) -> int:
    if group_size == -1 or group_size >= in_features:
        return in_features
    if group_size < 1:
        raise CheckpointError(f"{name}: group_size {group_size} is neither -1 (per-channel) nor a width >= 1")
    return group_size


def _g_idx(g_idx: torch.Tensor | None, in_features: int, group: int, name: str) -> torch.Tensor | None:
    """The act-order group of every input column, or None when it is the plain ``k // group_size``."""
    if g_idx is None:
        return None
    if g_idx.dtype not in (torch.int32, torch.int64) or tuple(g_idx.shape) != (in_features,):
        raise CheckpointError(f"{name}: expected ({in_features},) integers, got {g_idx.dtype} {tuple(g_idx.shape)}")
    groups = packing.num_groups(in_features, group)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise CheckpointError(f"{name}: group indices must lie in [0, {groups - 1}]")
    if torch.equal(g_idx.long(), torch.arange(in_features) // group):
        return None
    return g_idx.to(torch.int32).contiguous()


__all__ = [
    "CheckpointError",
    "QuantizedCheckpoint",
    "bytes_to_words",
    "export_compressed_tensors",
    "pack_words",
    "packed_linears",
    "read_checkpoint",
    "unpack_words",
    "words_to_bytes",
]
