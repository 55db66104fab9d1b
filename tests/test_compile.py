"""compile(): recipes or passes, targets, calibration, reports, export and load."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import lowbit
from lowbit.errors import (
    ArtifactError,
    BackendError,
    CalibrationError,
    LowbitError,
    PassOrderError,
    RecipeError,
    TraceError,
    UnknownPassError,
    UnsupportedLayerError,
)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8 * 8 * 8, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


EXAMPLE = (torch.randn(2, 3, 8, 8),)


def test_compile_with_passes_runs_on_torch_and_reports(net):
    compiled = lowbit.compile(net, EXAMPLE, passes=["rtn"])
    report = compiled.report
    assert report.target == "torch" and report.recipe is None
    assert report.parameters == sum(p.numel() for p in net.parameters())
    assert report.bytes_after < report.bytes_before / 3
    assert 0 < report.rel_error < 0.1
    with torch.no_grad():
        assert torch.allclose(compiled(*EXAMPLE), compiled.graph(*EXAMPLE))
        assert (compiled(*EXAMPLE) - net(*EXAMPLE)).abs().max().item() == pytest.approx(report.max_abs_diff)
    assert "rtn" in str(report) and "smaller" in str(report)


def test_compile_with_recipe_and_target_override(net):
    compiled = lowbit.compile(net, EXAMPLE, recipe="w4a16-x86", target="torch")
    assert compiled.report.recipe == "w4a16-x86"
    assert [r.name for r in compiled.report.pipeline.passes[:2]] == ["fold_batchnorm", "rtn"]


def test_export_and_load_reproduce_outputs(net, tmp_path):
    compiled = lowbit.compile(net, EXAMPLE, passes=[lowbit.passes.get("rtn", bits=8)])
    path = compiled.export(tmp_path / "artifact")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"] == "torch" and manifest["passes"][0]["bits"] == 8
    assert manifest["inputs"] == [{"name": "0", "shape": [2, 3, 8, 8], "dtype": "float32"}]
    assert set(manifest["files"]) == {"graph.pt"} and manifest["versions"]["torch"] == torch.__version__
    loaded = lowbit.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(*EXAMPLE), compiled(*EXAMPLE))
    with pytest.raises(ArtifactError, match="built for target 'torch', not 'x86'"):
        lowbit.load(path, target="x86")
    with pytest.raises(ArtifactError, match="not empty"):
        compiled.export(path)
    compiled.export(path, overwrite=True)


def test_corrupted_artifact_is_refused(net, tmp_path):
    path = lowbit.compile(net, EXAMPLE).export(tmp_path / "a")
    with (path / "graph.pt").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match="checksum mismatch for graph.pt"):
        lowbit.load(path)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        lowbit.load(tmp_path)


def test_failed_export_leaves_no_directory(net, tmp_path, monkeypatch):
    compiled = lowbit.compile(net, EXAMPLE)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        compiled.export(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"target": {"kind": "cuda", "arch": "sm_75"}}, BackendError, "older than sm_80"),
        ({"target": "tpu"}, BackendError, "unknown target 'tpu'"),
        ({"recipe": "w4a8-x86", "target": "torch"}, CalibrationError, "gptq need calibration data"),
        ({"recipe": "w4a16-x86", "passes": ["rtn"]}, LowbitError, "either recipe= or passes="),
        ({"passes": ["nope"]}, UnknownPassError, "unknown pass 'nope'"),
        ({"passes": ["rtn"], "calibration": []}, CalibrationError, "empty"),
        (
            {"passes": ["rtn"], "calibration": [(torch.randn(2, 3, 4, 4),)]},
            CalibrationError,
            r"x \(2, 3, 4, 4\)\): the model does not run",
        ),
    ],
)
def test_bad_calls_fail_before_any_work(net, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        lowbit.compile(net, EXAMPLE, dump_dir=tmp_path / "dump", **kwargs)
    assert not (tmp_path / "dump").exists()


def test_pass_order_violation_writes_nothing(net, tmp_path):
    rtn4, rtn8 = lowbit.passes.get("rtn"), lowbit.passes.get("rtn", bits=8)

    class Late(type(rtn4)):
        name = "compile_test_late"
        after_pack = False

    with pytest.raises(PassOrderError, match="compile_test_late"):
        lowbit.compile(net, EXAMPLE, passes=[rtn4, rtn8, Late()], dump_dir=tmp_path / "dump")
    assert not (tmp_path / "dump").exists()


def test_untraceable_model_is_a_trace_error(tmp_path):
    with pytest.raises(TraceError, match="inner"):
        lowbit.compile(Outer(), (torch.randn(1, 4),), passes=["rtn"], dump_dir=tmp_path / "dump")
    assert not (tmp_path / "dump").exists()
    compiled = lowbit.compile(Outer(), (torch.randn(1, 4),), leaf_modules=[Branchy])
    assert compiled.report.max_abs_diff == 0


def test_prepare_returns_a_trainable_graph(net):
    graph = lowbit.prepare(net.train(), EXAMPLE, passes=[])
    assert graph.training
    loss = graph(*EXAMPLE).square().mean()
    loss.backward()
    assert graph.get_submodule("fc1").weight.grad is not None


@pytest.mark.parametrize(
    "body, message",
    [
        ("target: torch\nconvert:\n  - pass: rtn\n    bits: 5\n", r"convert\[0\]\.bits: rtn: bits=5 is not supported"),
        ("target: torch\nconvert: []\nquantize: yes\n", "quantize: unknown key"),
    ],
)
def test_bad_recipe_file_fails_before_any_work(net, tmp_path, body, message):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(body)
    with pytest.raises(RecipeError, match=message) as info:
        lowbit.compile(net, EXAMPLE, recipe=recipe, dump_dir=tmp_path / "dump")
    assert "mine.yaml" in str(info.value)
    assert not (tmp_path / "dump").exists()


def test_a_prepared_and_trained_graph_compiles_without_retracing(net):
    graph = lowbit.prepare(net.train(), EXAMPLE, passes=[lowbit.passes.get("lora", rank=2, targets=["fc1", "fc2"])])
    optimizer = torch.optim.SGD([p for p in graph.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        graph(*EXAMPLE).square().mean().backward()
        optimizer.step()
    graph.eval()
    with torch.no_grad():
        trained = graph(*EXAMPLE)
    compiled = lowbit.compile(graph, EXAMPLE, passes=["merge_adapters"])
    assert compiled.report.tracer == graph.meta["lowbit_tracer"]
    with torch.no_grad():
        assert torch.allclose(compiled(*EXAMPLE), trained, atol=1e-5)
    with pytest.raises(PassOrderError, match="merge_adapters"):
        lowbit.compile(graph, EXAMPLE, passes=["rtn"])


def test_compile_for_arm_cross_compiles_and_exports(net, tmp_path):
    compiled = lowbit.compile(net, EXAMPLE, recipe="w4a16-arm")
    assert compiled.report.target == "arm" and "not measured" in str(compiled.report)
    path = compiled.export(tmp_path / "arm")
    library = next(p for p in path.iterdir() if p.suffix == ".so")
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(ArtifactError):
        lowbit.load(path)


def test_report_warns_above_max_rel_error(net, caplog):
    with caplog.at_level(logging.INFO, logger="lowbit"):
        compiled = lowbit.compile(net, EXAMPLE, passes=["rtn:bits=2,group_size=8"], max_rel_error=1e-4)
    assert compiled.report.rel_error > 1e-4 and len(compiled.report.warnings) == 1
    assert "WARNING           relative error to eager" in str(compiled.report)
    assert "exceeds 0.0001" in caplog.text
    assert "tracing Net" in caplog.text and "building for target torch" in caplog.text
    assert not lowbit.compile(net, EXAMPLE, passes=["rtn:bits=8"]).report.warnings


def test_loaded_artifact_keeps_report_and_warnings(net, tmp_path):
    compiled = lowbit.compile(net, EXAMPLE, passes=["rtn:bits=2,group_size=8"], max_rel_error=1e-4)
    loaded = lowbit.load(compiled.export(tmp_path / "a"))
    assert isinstance(loaded, lowbit.CompiledModel) and loaded.report.warnings == compiled.report.warnings
    assert loaded.report.bytes_after == compiled.report.bytes_after and loaded.report.tracer == compiled.report.tracer
    assert loaded.export(tmp_path / "b").is_dir()


def test_recurrent_and_attention_layers_compile_for_x86_with_their_linears_quantized():
    class Sequence(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
            self.gru = torch.nn.GRU(32, 16, batch_first=True)
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
            y, _ = self.lstm(x)
            y, _ = self.gru(y)
            return self.attn(y, y, y, key_padding_mask=padding)[0]

    torch.manual_seed(0)
    model = Sequence().eval()
    x, padding = torch.randn(2, 5, 8), torch.tensor([[False] * 4 + [True], [False] * 5])
    dense = lowbit.compile(model, (x, padding), target="x86")
    assert dense.report.rel_error < 1e-4
    compiled = lowbit.compile(model, (x, padding), passes=["rtn:bits=8,group_size=-1"], target="x86")
    quantized = {r.layer for r in compiled.report.pipeline.passes[0].layers if r.action == "quantized"}
    assert {"lstm.ih_l1_reverse", "lstm.hh_l0", "gru.hh_l0", "attn.q_proj", "attn.out_proj"} <= quantized
    assert compiled.report.rel_error < 0.02


def test_layers_the_kernels_cannot_serve_are_announced_before_the_build(net, caplog):
    with caplog.at_level(logging.INFO, logger="lowbit"):
        # The convolution stays fp32 here: a packed one would be announced as well (no convolution kernel yet).
        compiled = lowbit.compile(net, EXAMPLE, passes=["rtn:bits=3,group_size=32,ignore=conv"], target="x86")
    messages = [record.getMessage() for record in caplog.records]
    announced = [i for i, m in enumerate(messages) if "dequantized fp32 fallback" in m]
    built = next(i for i, m in enumerate(messages) if m.startswith("built ") or "building" in m.lower())
    assert len(announced) == 2 and all(caplog.records[i].levelno == logging.WARNING for i in announced)
    assert all("3-bit" in messages[i] and "nearest supported setting: bits=4" in messages[i] for i in announced)
    assert compiled.report.fallbacks and all("bits=4" in item for item in compiled.report.fallbacks)
    assert built < announced[0]  # "building for target" precedes lowering; the TVM build itself comes after


def test_strict_refuses_fallback_layers_before_building(net, monkeypatch):
    from lowbit.backends.tvm.toolchains.cpu import CPUToolchain

    def no_build(*args, **kwargs):
        raise AssertionError("strict must refuse before the build")

    monkeypatch.setattr(CPUToolchain, "build", no_build)
    with pytest.raises(
        UnsupportedLayerError, match=r"(?s)2 low-bit layer.*fc1 \(fc1_packed\): 3-bit.*bits=4.*strict=False"
    ):
        lowbit.compile(net, EXAMPLE, passes=["rtn:bits=3,group_size=32,ignore=conv"], target="x86", strict=True)
    assert issubclass(UnsupportedLayerError, BackendError)


def test_initial_states_separate_attention_weights_and_masks_compile_for_x86():
    class Stateful(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(8, 16, bidirectional=True, bias=False)
            self.lstm = torch.nn.LSTM(32, 16)
            self.attn = torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=8)

        def forward(self, x, h0, c0, memory, mask):
            y, h = self.gru(x, h0)
            y, (_, c) = self.lstm(y, (h0[:1], c0))
            out, weights = self.attn(y, memory, memory, attn_mask=mask)
            return out, weights, h, c

    torch.manual_seed(0)
    mask = torch.rand(5, 6) > 0.7
    mask[:, 0] = False
    inputs = (torch.randn(5, 2, 8), torch.randn(2, 2, 16), torch.randn(1, 2, 16), torch.randn(6, 2, 8), mask)
    compiled = lowbit.compile(Stateful().eval(), inputs, target="x86")
    assert compiled.report.tracer == "fx" and compiled.report.rel_error < 1e-4


def test_agreement_counts_attended_tokens_only():
    from lowbit.compiler import attended_positions, output_agreement

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    attended = attended_positions(("input_ids", "attention_mask"), (torch.zeros(2, 4, dtype=torch.long), mask), {})
    assert torch.equal(attended, mask.bool())
    expected = torch.randn(2, 4, 8)
    actual = expected.clone()
    actual[~mask.bool()] += 100.0  # padded positions: not defined by the model
    pooled = expected[:, 0]
    assert output_agreement((expected, pooled), (actual, pooled.clone()), attended) == (0.0, 0.0)
    max_abs, rel = output_agreement((expected, pooled), (actual, pooled.clone()))
    assert max_abs == pytest.approx(100.0) and rel > 1
    actual[0, 0] += 1.0  # an attended position counts
    assert output_agreement(expected, actual, attended)[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"attention_mask": torch.ones(2, 4, dtype=torch.long)},  # nothing padded
        {"attention_mask": torch.full((2, 4), 0.5)},  # not ones and zeros
        {"attention_mask": torch.ones(2, 4, 4, dtype=torch.long)},  # not [batch, tokens]
    ],
)
def test_agreement_counts_every_position_without_padding_mask(kwargs):
    from lowbit.compiler import attended_positions

    assert attended_positions(("input_ids",), (torch.zeros(2, 4, dtype=torch.long),), kwargs) is None
