"""End to end: GraphModules compiled by TVMBackend match the torch graph."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from lowbit import passes
from lowbit.backends.tvm import TVMBackend
from lowbit.backends.tvm.lowering import lower
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.toolchains.cpu import CPUToolchain, unscheduled_functions
from lowbit.errors import BackendError
from lowbit.ir import ops, packing


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected.detach()).abs().max() / expected.detach().abs().max())


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 10))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.LayerNorm(16),
        nn.Softmax(dim=-1),
    ).eval()


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (2, False), (8, True)])
def test_quantized_mlp_matches_torch(bits: int, symmetric: bool) -> None:
    gm = passes.Pipeline([passes.get("rtn", bits=bits, group_size=32, symmetric=symmetric)])(fx.symbolic_trace(_mlp()))
    x = torch.randn(8, 128)
    runner = TVMBackend("x86").compile(gm, (x,))
    # 8 rows: the panel GEMM, except on the last layer, whose 10 outputs are no multiple of a vector
    assert [linear.kernel for linear in runner.linears] == ["packed_gemm", "packed_gemm", "packed_linear"]
    assert _relative_error(runner(x), gm(x)) < 1e-5


def test_w4_g64_pipeline_with_3d_input_matches_torch() -> None:
    gm = passes.Pipeline([passes.get("rtn", bits=4, group_size=64)])(fx.symbolic_trace(_mlp()))
    x = torch.randn(2, 3, 128)
    runner = TVMBackend().compile(gm, (x,))
    out = runner(x)
    assert out.shape == (2, 3, 10)
    assert _relative_error(out, gm(x)) < 1e-5


def test_three_bit_weights_use_the_dense_fallback() -> None:
    gm = passes.Pipeline([passes.get("rtn", bits=3, group_size=32)])(fx.symbolic_trace(_mlp()))
    x = torch.randn(4, 128)
    runner = TVMBackend().compile(gm, (x,))
    assert {linear.kernel for linear in runner.fallbacks} == {"dense"}
    assert all("3-bit" in linear.reason for linear in runner.fallbacks)
    assert _relative_error(runner(x), gm(x)) < 1e-5


class _GroupIndexLinear(nn.Module):
    """A packed linear with a group index: permuted whole groups as act-order GPTQ writes them, or uneven groups."""

    def __init__(self, g_idx: torch.Tensor, in_features: int = 64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (24, in_features), generator=gen, dtype=torch.uint8)
        self.register_buffer("qweight", packing.pack(codes, 4))
        self.register_buffer("scales", torch.rand(24, -(-in_features // 16), generator=gen) + 0.1)
        self.register_buffer("g_idx", g_idx.to(torch.int32))
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_packed(x, self.qweight, self.scales, None, self.g_idx, None, 4, 16, self.in_features)


ACT_ORDER = torch.randperm(64, generator=torch.Generator().manual_seed(0)) % 4
ACT_ORDER_RAGGED = torch.randperm(56, generator=torch.Generator().manual_seed(0)) // 16  # groups of 16, 16, 16, 8
UNEVEN = torch.tensor([0] * 20 + [1] * 12 + [2] * 16 + [3] * 16)


@pytest.mark.parametrize(("g_idx", "rows"), [(ACT_ORDER, 5), (ACT_ORDER, 1), (ACT_ORDER_RAGGED, 5)])
def test_act_order_g_idx_runs_on_the_packed_kernels(g_idx: torch.Tensor, rows: int) -> None:
    """Whole groups in permuted columns: the columns are sorted by group (and a partial last group padded)."""
    gm = fx.symbolic_trace(_GroupIndexLinear(g_idx, len(g_idx)))
    x = torch.randn(rows, len(g_idx))
    runner = TVMBackend().compile(gm, (x,))
    assert not runner.fallbacks and runner.linears[0].spec.in_features == 64
    assert _relative_error(runner(x), gm(x)) < 1e-5


def test_uneven_groups_use_the_dense_fallback() -> None:
    gm = fx.symbolic_trace(_GroupIndexLinear(UNEVEN))
    x = torch.randn(5, 64)
    runner = TVMBackend().compile(gm, (x,))
    assert [linear.reason for linear in runner.fallbacks] == [
        "act-order g_idx permutes groups; the packed kernel needs contiguous groups"
    ]
    assert _relative_error(runner(x), gm(x)) < 1e-5


def test_partial_last_group_is_padded_onto_the_packed_kernel() -> None:
    """in_features=56 in groups of 16: padded to 64 columns with zero codes and zero inputs, exactly."""
    gen = torch.Generator().manual_seed(1)
    gm = passes.Pipeline([passes.get("rtn", bits=4, group_size=16)])(
        fx.symbolic_trace(nn.Sequential(nn.Linear(56, 32, bias=False)))
    )
    for rows in (1, 6):
        x = torch.randn(rows, 56, generator=gen)
        runner = TVMBackend().compile(gm, (x,))
        assert not runner.fallbacks and [linear.spec.in_features for linear in runner.linears] == [64]
        assert _relative_error(runner(x), gm(x)) < 1e-5


@pytest.mark.parametrize("model", [_mlp, _cnn])
def test_fp32_models_match_torch(model: type) -> None:
    gm = fx.symbolic_trace(model().eval())
    x = torch.randn(2, 128) if model is _mlp else torch.randn(2, 3, 16, 16)
    runner = TVMBackend().compile(gm, (x,))
    with torch.no_grad():
        assert _relative_error(runner(x), gm(x)) < 1e-5


def test_every_function_of_the_cnn_gets_a_schedule() -> None:
    toolchain = CPUToolchain(resolve_target("x86"))
    lowering = lower(fx.symbolic_trace(_cnn()), (torch.randn(1, 3, 16, 16),), toolchain)
    assert unscheduled_functions(toolchain.schedule(lowering.mod)) == []


def test_tuple_outputs_come_back_as_a_tuple() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), torch.relu(self.b(x))

    gm = fx.symbolic_trace(Heads())
    x = torch.randn(3, 16)
    got = TVMBackend().compile(gm, (x,))(x)
    assert isinstance(got, tuple) and len(got) == 2
    for value, expected in zip(got, gm(x)):
        assert _relative_error(value, expected) < 1e-5


def test_arm_cross_compiles_but_does_not_run_here() -> None:
    gm = passes.Pipeline([passes.get("rtn", bits=4, group_size=32)])(fx.symbolic_trace(_mlp()))
    x = torch.randn(2, 128)
    runner = TVMBackend("arm").compile(gm, (x,))
    assert "fmla" in runner.executable.mod.imports[0].inspect_source("asm")  # NEON fused multiply-add
    with pytest.raises(BackendError, match="cross-compiled for aarch64"):
        runner(x)


def test_unsupported_operator_is_a_backend_error() -> None:
    class Det(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.det(x)

    with pytest.raises(BackendError, match="cannot import"):
        TVMBackend().compile(fx.symbolic_trace(Det()), (torch.randn(3, 3),))


def test_errors_are_backend_errors() -> None:
    with pytest.raises(BackendError, match="unknown target"):
        TVMBackend("riscv")
    gm = fx.symbolic_trace(nn.Linear(8, 4))
    x = torch.randn(2, 8)
    with pytest.raises(BackendError, match="CPU"):
        TVMBackend({"kind": "opencl"}).compile(gm, (x,))
    with pytest.raises(BackendError, match="tuning"):
        TVMBackend().compile(gm, (x,), tune="meta_schedule")
    runner = TVMBackend().compile(gm, (x,))
    with pytest.raises(BackendError, match="compiled for inputs"):
        runner(torch.randn(3, 8))


class _LinearForms(nn.Module):
    """An fp32 linear as a module, as ``F.linear`` on parameters, and as ``F.linear`` on a weight given as input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(64, 48)
        self.weight = nn.Parameter(torch.randn(40, 48))

    def forward(self, x: torch.Tensor, runtime_weight: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.linear(self.layer(x), self.weight)
        return nn.functional.linear(hidden, runtime_weight)


def test_fp32_linears_with_constant_weights_run_on_the_dense_kernel() -> None:
    """The module and the functional form with a constant weight become the dense kernel; a weight that is an
    input stays Relax's linear. The result matches torch either way."""
    gm = fx.symbolic_trace(_LinearForms().eval())
    x, runtime_weight = torch.randn(2, 3, 64), torch.randn(8, 40)
    lowering = lower(gm, (x, runtime_weight), CPUToolchain(resolve_target("x86")))
    names = [gvar.name_hint for gvar, _ in lowering.mod.functions_items()]
    assert sum(name.startswith("lowbit_fp32_linear") for name in names) == 2, names
    runner = TVMBackend("x86").compile(gm, (x, runtime_weight))
    assert _relative_error(runner(x, runtime_weight), gm(x, runtime_weight)) < 1e-5


def test_inputs_whose_data_is_not_64_byte_aligned_are_accepted() -> None:
    """A view 4 bytes into its storage (as slices and numpy arrays often are): TVM's DLPack import refuses such
    data, so the runner hands TVM an aligned copy."""
    gm = fx.symbolic_trace(_mlp().eval())
    x = torch.randn(2, 128)
    runner = TVMBackend().compile(gm, (x,))
    storage = torch.randn(1 + x.numel())
    shifted = storage[1:].view(2, 128)
    assert shifted.data_ptr() % 64
    with torch.no_grad():
        assert _relative_error(runner(shifted), gm(shifted)) < 1e-5
