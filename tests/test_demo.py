"""The main job on its real model: all-MiniLM-L6-v2 with real weights, default recipe, against ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lowbit import demo, onnx_peer, zoo
from lowbit.cli import main


def test_demo_compiles_the_real_model_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["-q", "demo", "--repeats", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for label in (
        "parameters",
        "size",
        "accuracy",
        "speed",
        demo.DEFAULT_RECIPE,
        "ORT int8 (per channel)",
        "lowbit speedup over ORT int8 (per channel)",
        "lowbit speedup over torch eager fp32",
        "load average",
    ):
        assert label in text
    results = json.loads(out.read_text())
    assert results["parameters"] == 22_713_216
    # Linear layers go to 8 bits per channel, the embedding tables (half the parameters) to 8-bit groups of 32:
    # 90.9 MB -> 24.4 MB (3.73x; 1.55x while the tables stayed fp32).
    assert 3.5 < results["bytes_fp32"] / results["bytes_compiled"] < 4
    # W8A8 (RTN per channel, int8 per-token activations) measures ~0.997 on this model.
    assert results["cosine_mean"] > 0.99 and results["cosine_min"] > 0.985
    assert results["eager_ms"] > 0 and results["compiled_ms"] > 0
    names = [p["name"] for p in results["passes"]["passes"]]
    assert names == ["fold_batchnorm", "rtn", "quantize_embeddings", "quantize_activations"]

    engines = results["engines"]
    assert list(engines) == ["torch", "ort_fp32", "ort_int8", "ort_int8_default", "lowbit"]
    assert engines["lowbit"]["cosine_mean"] == results["cosine_mean"]
    # The fp32 export computes what eager does; ORT's per-channel int8 measures ~0.993, per tensor ~0.968.
    assert engines["ort_fp32"]["cosine_min"] > 0.9999
    assert engines["ort_int8"]["cosine_mean"] > 0.985 and engines["ort_int8_default"]["cosine_mean"] > 0.9
    # Every engine timed at every thread count, each in its own process; the summary numbers come from there.
    assert [timing["threads"] for timing in results["timings"]] == list(demo.THREAD_COUNTS)
    for timing in results["timings"]:
        assert set(timing["ms"]) == set(engines)
        assert all(0 < ms["min"] <= ms["median"] <= ms["max"] for ms in timing["ms"].values())
        assert set(timing["lowbit_speedup"]) == set(engines) - {"lowbit"}
    assert results["eager_ms"] == min(timing["ms"]["torch"]["median"] for timing in results["timings"])
    assert results["compiled_ms"] == min(timing["ms"]["lowbit"]["median"] for timing in results["timings"])
    assert results["rounds"] == 2 and set(results["load_average_1min"]) == {"start", "end"}


def test_onnx_peer_quantizes_weights_per_channel_and_per_tensor(tmp_path) -> None:
    """ORT's dynamic int8 models of a tiny BERT: int8 weights with a scale per output column or one per tensor."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.int64)}
    variants = onnx_peer.export(model, inputs, tmp_path)
    assert [v.name for v in variants] == ["ort_fp32", "ort_int8", "ort_int8_default"]

    def weight_scales(path) -> list[np.ndarray]:
        graph = onnx.load(str(path)).graph
        arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        return [
            arrays[node.input[1].removesuffix("_quantized") + "_scale"]
            for node in graph.node
            if node.op_type == "MatMulInteger"
        ]

    per_channel, per_tensor = weight_scales(variants[1].path), weight_scales(variants[2].path)
    assert per_channel and len(per_channel) == len(per_tensor)
    assert {scale.size for scale in per_tensor} == {1}
    assert {scale.size for scale in per_channel} == {32, 64}

    with torch.no_grad():
        expected = model(**inputs).last_hidden_state.numpy()
    np.testing.assert_allclose(onnx_peer.session(variants[0].path, inputs, 1)()[0], expected, atol=1e-4)
    assert np.abs(onnx_peer.session(variants[1].path, inputs, 1)()[0] - expected).max() < 0.2


def test_calibration_windows_are_unpadded_and_batched_like_the_example() -> None:
    minilm = zoo.load_minilm()
    windows = demo._calibration_windows(minilm.tokenizer, demo.CALIBRATION_TEXT.read_text(), 16)
    assert windows["input_ids"].shape == (16, demo.SEQ_LEN)
    assert bool((windows["attention_mask"] == 1).all())
    assert bool((windows["input_ids"][:, 0] == minilm.tokenizer.cls_token_id).all())
    assert bool((windows["input_ids"][:, -1] == minilm.tokenizer.sep_token_id).all())
