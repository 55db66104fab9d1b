"""The main job on its real model: all-MiniLM-L6-v2 with real weights, default recipe."""

from __future__ import annotations

import json

from lowbit import demo, zoo
from lowbit.cli import main


def test_demo_compiles_the_real_model_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["-q", "demo", "--repeats", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("parameters", "size", "accuracy", "speed", demo.DEFAULT_RECIPE):
        assert label in text
    results = json.loads(out.read_text())
    assert results["parameters"] == 22_713_216
    # Linear layers go to 8 bits; the word embeddings (half the parameters) stay fp32.
    assert 1.2 < results["bytes_fp32"] / results["bytes_compiled"] < 2
    # W8A8 (RTN per channel, int8 per-token activations) measures ~0.997 on this model.
    assert results["cosine_mean"] > 0.99 and results["cosine_min"] > 0.985
    assert results["eager_ms"] > 0 and results["compiled_ms"] > 0
    assert [p["name"] for p in results["passes"]["passes"]] == ["rtn", "quantize_activations"]


def test_calibration_windows_are_unpadded_and_batched_like_the_example() -> None:
    minilm = zoo.load_minilm()
    windows = demo._calibration_windows(minilm.tokenizer, demo.CALIBRATION_TEXT.read_text(), 16)
    assert windows["input_ids"].shape == (16, demo.SEQ_LEN)
    assert bool((windows["attention_mask"] == 1).all())
    assert bool((windows["input_ids"][:, 0] == minilm.tokenizer.cls_token_id).all())
    assert bool((windows["input_ids"][:, -1] == minilm.tokenizer.sep_token_id).all())
