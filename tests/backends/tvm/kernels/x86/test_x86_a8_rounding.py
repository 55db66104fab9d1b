"""The x86 int8 linear kernels round every float32 step of their output stage apart, as the reference op does.

Random float scales, a static step that is no power of two and a bias of large magnitude make a fused multiply-add
round differently from a product then a sum, in the groups' accumulation (``acc + sum · scale``) and in the epilogue
(``acc · Δ + bias``); each kernel (GEMV on VNNI and on AVX2, GEMM, AMX) must still equal the torch reference op.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import tvm
from tvm.target import Target
from x86_a8_layers import layer_spec, reference, run

from lowbit.backends.tvm.kernels.spec import LinearKernel
from lowbit.backends.tvm.kernels.x86 import a8_amx, a8_gemm, a8_linear
from lowbit.backends.tvm.target import has_features, x86_host_target
from lowbit.ir import ops_a8, packing

K, N, GROUP, STEP = 256, 256, 64, 0.0371
HOST = Target(x86_host_target())


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel on the target it is built for, the rows it runs and the host features it needs."""

    name: str
    kernel: LinearKernel
    target: Target
    rows: int
    features: tuple[str, ...]


CASES = [
    Case("gemv_vnni", a8_linear.KERNEL, Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2}), 1, ("avx512vnni",)),
    Case("gemv_avx2", a8_linear.KERNEL, Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2}), 1, ("avx2",)),
    Case("gemm", a8_gemm.KERNEL, Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2}), 16, ("avx512vnni",)),
    Case("amx", a8_amx.KERNEL, Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}), 32, ("amx-int8",)),
]


def _layer(asym: bool, static: bool, seed: int) -> dict:
    """8-bit codes, random float32 scales, [zero points], a bias of magnitude about 100, [the step `STEP`]."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (N, K), generator=gen, dtype=torch.uint8)
    return {
        "qweight": packing.pack(codes, 8),
        "scales": torch.rand(N, K // GROUP, generator=gen) * 0.1 + 0.01,
        "zeros": torch.randint(0, 256, (N, K // GROUP), generator=gen).float() if asym else None,
        "g_idx": None,
        "bias": torch.randn(N, generator=gen) * 100,
        "act_scale": torch.tensor(STEP) if static else None,
    }


def _fused_output_differs(x: torch.Tensor, weight: dict) -> bool:
    """Whether one rounding of ``acc · Δ + bias`` (float64, then float32) differs from the reference's two anywhere:
    the layer discriminates a contracted epilogue."""
    codes, step = ops_a8.quantize_activation(x, weight["act_scale"])
    acc = ops_a8.integer_linear(codes, weight["qweight"], weight["scales"], weight["zeros"], None, 8, GROUP, K)
    fused = (acc.double() * step.double() + weight["bias"].double()).float()
    return not torch.equal(fused, acc * step + weight["bias"])


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_output_stage_is_bit_exact_with_float_scales_and_bias(case: Case) -> None:
    layers = {
        f"{'asym' if asym else 'sym'}_{'static' if static else 'dynamic'}": _layer(asym, static, seed=index)
        for index, (asym, static) in enumerate([(False, True), (True, True), (False, False), (True, False)])
    }
    plans = {}
    for name, weight in layers.items():
        spec = layer_spec(case.rows, K, N, 8, GROUP, weight)
        assert case.kernel.supports(spec, weight, case.target) is None
        plans[name] = case.kernel.plan(spec, weight, case.target)
    mod = tvm.IRModule({name: plan.func.with_attr("global_symbol", name) for name, plan in plans.items()})
    lib = tvm.compile(mod, target=case.target)
    if not has_features(HOST, *case.features):
        pytest.skip(f"this host lacks {case.features}: compiled only")
    for name, weight in layers.items():
        x = torch.randn(case.rows, K, generator=torch.Generator().manual_seed(case.rows)) * 3
        if weight["act_scale"] is not None:
            assert _fused_output_differs(x, weight)
        got, ref = run(lib, name, plans[name], x, N), reference(x, weight, 8, GROUP, K)
        assert torch.equal(got, ref), f"{name}: {(got != ref).sum()} outputs differ, max {(got - ref).abs().max()}"
