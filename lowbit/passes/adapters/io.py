"""Adapter weights on disk: lowbit's own safetensors file and PEFT LoRA adapter directories.

`save_adapters` writes only the adapter parameters (``<layer>.<kind>.<param>``), plus,
for adapters whose init rewrote the base weight (PiSSA, SORSA), that residual weight
(``<layer>.weight``), as the PiSSA authors advise: the adapter alone does not reproduce
the model. The safetensors metadata records each layer's module and constructor spec.

`load_adapters` and `import_peft_lora` attach adapters to a graph that has none on those
layers and return the adapted copy, with only adapter parameters trainable. A file for
another architecture fails on its first key whose layer is missing or has another shape.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.ir.annotations import Adapter
from lowbit.passes.adapters.common import (
    MODULES,
    AdapterError,
    AdapterModule,
    BaseLayer,
    adapted_layers,
    adapter_module,
    attach,
    base_layers,
    close_names,
    freeze_base,
)
from lowbit.passes.adapters.lora import LoRAModule

log = logging.getLogger(__name__)

FORMAT = "lowbit-adapters"
PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def save_adapters(gm: fx.GraphModule, path: str | Path) -> dict[str, Any]:
    """Write the adapters of ``gm`` to ``path`` (safetensors); return the per-layer metadata."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for layer, _, adapter in adapted_layers(gm):
        module = adapter_module(gm, layer, adapter)
        for name, tensor in module.state_dict().items():
            tensors[f"{layer}.{adapter.kind}.{name}"] = tensor.detach().cpu().contiguous()
        if module.residual_base:
            residual = module.pre_merge["weight"] if module.pre_merge else gm.get_submodule(layer).weight
            tensors[f"{layer}.weight"] = residual.detach().cpu().contiguous()
        layers[layer] = {
            "module": type(module).__name__,
            "spec": module.spec(),
            "adapter": {"kind": adapter.kind, "rank": adapter.rank, "variant": adapter.variant},
            "residual": module.residual_base,
        }
    if not layers:
        raise AdapterError("save_adapters: the graph carries no adapter")
    save_file(tensors, str(path), metadata={"format": FORMAT, "layers": json.dumps(layers)})
    log.info("saved %d adapted layer(s), %d tensors to %s", len(layers), len(tensors), path)
    return layers


def load_adapters(gm: fx.GraphModule, path: str | Path) -> fx.GraphModule:
    """A copy of ``gm`` with the adapters saved in ``path`` attached and loaded."""
    tensors, metadata = _read(Path(path))
    if metadata.get("format") != FORMAT or "layers" not in metadata:
        raise AdapterError(f"{path}: not a lowbit adapter file (metadata format {metadata.get('format')!r})")
    specs: dict[str, Any] = json.loads(metadata["layers"])
    gm = copy.deepcopy(gm)
    layers = base_layers(gm)
    used: set[str] = set()
    for layer, entry in specs.items():
        if entry["module"] not in MODULES:
            raise AdapterError(f"{path}: layer '{layer}' uses unknown adapter module {entry['module']!r}")
        module = MODULES[entry["module"]](**entry["spec"])
        prefix = f"{layer}.{entry['adapter']['kind']}."
        state = {name: tensors.get(prefix + name) for name in module.state_dict()}
        first_key = prefix + next(iter(state))
        base = _matching_layer(layers, layer, first_key, module.in_features, module.out_features, path)
        for name, tensor in state.items():
            expected = tuple(module.state_dict()[name].shape)
            if tensor is None or tuple(tensor.shape) != expected:
                got = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
                raise AdapterError(f"{path}: key '{prefix + name}' is {got}; layer '{layer}' needs {expected}")
        module.load_state_dict(state)
        used.update(prefix + name for name in state)
        if entry["residual"]:
            _load_residual(gm, base, tensors, layer, path)
            used.add(f"{layer}.weight")
            module.residual_base = True
        _attach_like_base(gm, base, module, Adapter(**entry["adapter"]))
    _reject_unused(tensors, used, path)
    freeze_base(gm)
    log.info("loaded %d adapted layer(s) from %s", len(specs), path)
    return gm


def import_peft_lora(gm: fx.GraphModule, directory: str | Path) -> fx.GraphModule:
    """A copy of ``gm`` with the LoRA adapter of a PEFT directory (``save_pretrained``) attached.

    Reads ``adapter_config.json`` (rank, ``lora_alpha``, ``alpha_pattern``, rsLoRA,
    dropout) and ``adapter_model.safetensors`` (``base_model.model.<layer>.lora_A/B.weight``).
    PEFT options that change the computation beyond plain LoRA (DoRA, LoRA bias, extra
    trained modules) are rejected rather than silently dropped.
    """
    directory = Path(directory)
    config = _peft_config(directory)
    tensors, _ = _read(directory / "adapter_model.safetensors")
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise AdapterError(f"{directory}: key '{key}' is not a LoRA A/B weight; only plain LoRA is imported")
        pairs.setdefault(match["layer"], {})[match["which"]] = (key, tensor)
    gm = copy.deepcopy(gm)
    layers = base_layers(gm)
    for layer, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(
                f"{directory}: layer '{layer}' has lora_{next(iter(pair))} but no lora_{'B' if 'A' in pair else 'A'}"
            )
        (key_a, a), (key_b, b) = pair["A"], pair["B"]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            raise AdapterError(
                f"{directory}: key '{key_b}' of shape {tuple(b.shape)} does not pair with '{key_a}' "
                f"of shape {tuple(a.shape)}"
            )
        base = _matching_layer(layers, layer, key_a, a.shape[1], b.shape[0], directory)
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, layer, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        module = LoRAModule(a.shape[1], b.shape[0], rank, scale, float(config.get("lora_dropout") or 0.0))
        with torch.no_grad():
            module.A.copy_(a)
            module.B.copy_(b)
        _attach_like_base(gm, base, module, Adapter(kind="lora", rank=rank, variant="peft"))
    freeze_base(gm)
    log.info("imported a PEFT LoRA adapter for %d layer(s) from %s", len(pairs), directory)
    return gm


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            return tensors, dict(handle.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"{path}: cannot read safetensors file: {exc}") from exc


def _peft_config(directory: Path) -> dict[str, Any]:
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{directory} is not a PEFT adapter directory: {path.name} is missing")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are imported")
    for option in ("use_dora", "lora_bias"):
        if config.get(option):
            raise AdapterError(f"{path}: {option}=true is not plain LoRA and is not supported")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{path}: modules_to_save={config['modules_to_save']} (fully trained modules) is not "
            "supported; only LoRA A/B weights are imported"
        )
    return config


def _pattern_value(patterns: Mapping[str, Any], layer: str, default: Any) -> Any:
    """PEFT's per-layer pattern rule: a key matches a layer whose path ends in ``(.*\\.)?key``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return default


def _matching_layer(
    layers: dict[str, BaseLayer], layer: str, key: str, in_features: int, out_features: int, source: Any
) -> BaseLayer:
    """The graph's layer for ``key`` of ``source``; errors name the key when it does not fit."""
    base = layers.get(layer)
    if base is None:
        raise AdapterError(
            f"{source}: key '{key}' is for layer '{layer}', which this graph does not have{close_names(layer, layers)}"
        )
    if (base.in_features, base.out_features) != (in_features, out_features):
        raise AdapterError(
            f"{source}: key '{key}' is for a {in_features} -> {out_features} layer, but '{layer}' "
            f"is {base.in_features} -> {base.out_features} in this graph"
        )
    return base


def _load_residual(
    gm: fx.GraphModule, base: BaseLayer, tensors: Mapping[str, torch.Tensor], layer: str, source: Any
) -> None:
    key = f"{layer}.weight"
    if base.packed:
        raise AdapterError(f"{source}: key '{key}' is a residual base weight but '{layer}' is packed in this graph")
    weight = gm.get_submodule(layer).weight
    residual = tensors.get(key)
    if residual is None or residual.shape != weight.shape:
        raise AdapterError(f"{source}: key '{key}' (residual base weight) is missing or not {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(residual)


def _attach_like_base(gm: fx.GraphModule, base: BaseLayer, module: AdapterModule, adapter: Adapter) -> None:
    """Attach ``module`` unless the layer already carries an adapter."""
    existing = [a for p, _, a in adapted_layers(gm) if p == base.path]
    if existing:
        raise AdapterError(f"layer '{base.path}' already carries an adapter ({existing[0].describe()})")
    attach(gm, base, module, adapter)


def _reject_unused(tensors: Mapping[str, torch.Tensor], used: set[str], source: Any) -> None:
    unused = [key for key in tensors if key not in used]
    if unused:
        raise AdapterError(f"{source}: key '{unused[0]}' belongs to no adapter recorded in the file's metadata")


__all__ = ["FORMAT", "import_peft_lora", "load_adapters", "save_adapters"]
