"""The fake-quantized activations the fallbacks of int8-activation layers multiply, against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from lowbit.backends.tvm.kernels.generic.activations import fake_quant_cpu_func
from lowbit.backends.tvm.target import resolve_target
from lowbit.ir import ops_a8

K = 256


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_fallback_input_is_the_reference_fake_quant(dynamic: bool) -> None:
    """The dense fallback's input equals ``fake_quantize_activation`` bit for bit."""
    target = resolve_target("x86")
    step = None if dynamic else torch.tensor(0.0371)
    func = fake_quant_cpu_func(3, K, None if step is None else float(step), name="fq")
    lib = tvm.compile(tvm.IRModule({"fq": func}), target=target)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(5)) * 2
    out = tvm.runtime.tensor(np.zeros((3, K), dtype="float32"))
    lib["fq"](tvm.runtime.tensor(x.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()), ops_a8.fake_quantize_activation(x, step))
