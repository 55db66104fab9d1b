"""The runner base: inputs bound and refused the same way on every device, and the saved signature round trip."""

from __future__ import annotations

import pytest
import torch

from lowbit.backends import Runner as RunnerProtocol
from lowbit.backends.tvm import runner as runner_module
from lowbit.backends.tvm.convert import LoweredLinear
from lowbit.backends.tvm.frontend import InputSpec
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.runner import (
    CPURunner,
    CUDARunner,
    read_signature,
    signature_inputs,
    signature_interface,
    signature_linears,
    write_signature,
)
from lowbit.backends.tvm.target import resolve_target
from lowbit.errors import BackendError
from lowbit.interface import Interface

INPUTS = [InputSpec("x", (2, 8), "float32"), InputSpec("mask", (2,), "bool")]
LINEARS = [
    LoweredLinear("fc", PackedLinearSpec(2, 8, 4, 4, 8, False, True), "packed_linear"),
    LoweredLinear("head", PackedLinearSpec(2, 8, 4, 3, 8, True, False), "dense", "3-bit codes"),
]


@pytest.fixture
def runners(monkeypatch) -> list:
    """A CPU runner cross-compiled for another architecture and a CUDA runner on a machine without a GPU: neither
    can run here, and neither needs an executable to bind inputs."""
    monkeypatch.setattr(runner_module, "cuda_available", lambda: False)
    other = "x86_64" if runner_module.host_arch() == "aarch64" else "aarch64"
    return [CPURunner(None, other, [], INPUTS, LINEARS), CUDARunner(None, resolve_target("cuda"), INPUTS, LINEARS)]


def _outcome(runner, *args, **kwargs) -> str:
    try:
        values = runner.bind(args, kwargs)
    except BackendError as error:
        return str(error)
    return repr([(tuple(v.shape), v.dtype) for v in values])


def test_cpu_and_cuda_runners_bind_and_refuse_inputs_alike(runners) -> None:
    x, mask = torch.randn(2, 8), torch.ones(2, dtype=torch.bool)
    calls = [
        ((x, mask), {}),
        ((x,), {"mask": mask}),
        ((), {"mask": mask, "x": x}),
        ((x,), {}),
        ((x, mask, x), {}),
        ((x,), {"other": mask}),
        ((torch.randn(3, 8), mask), {}),
        ((x.double(), mask), {}),
    ]
    outcomes = [[_outcome(runner, *args, **kwargs) for args, kwargs in calls] for runner in runners]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][:3] == [repr([((2, 8), torch.float32), ((2,), torch.bool)])] * 3
    assert "compiled for inputs" in outcomes[0][3] and "takes inputs ['x', 'mask']" in outcomes[0][4]
    assert "takes inputs" in outcomes[0][5] and all("compile it again" in text for text in outcomes[0][6:])
    assert "of shapes [(2, 8), (2,)], got [(3, 8), (2,)]" in outcomes[0][6]
    assert "input 'x' is float64, but this module was compiled for float32" in outcomes[0][7]


def test_a_runner_that_cannot_run_here_says_why(runners) -> None:
    cpu, cuda = runners
    assert isinstance(cpu, RunnerProtocol) and isinstance(cuda, RunnerProtocol)
    assert not cpu.runnable and not cuda.runnable
    assert cpu.fallbacks == cuda.fallbacks == [LINEARS[1]] and cpu.tuning == cuda.tuning == []
    with pytest.raises(BackendError, match="cross-compiled for"):
        cpu(torch.randn(2, 8), torch.ones(2, dtype=torch.bool))
    with pytest.raises(BackendError, match="no CUDA device"):
        cuda(torch.randn(2, 8), torch.ones(2, dtype=torch.bool))


def test_signature_round_trip(runners, tmp_path) -> None:
    cpu = runners[0]
    for runner in runners:
        write_signature(tmp_path, runner.signature())
        signature = read_signature(tmp_path)
        assert signature_inputs(signature) == INPUTS and signature_linears(signature) == LINEARS
    assert read_signature(tmp_path).keys() == {"inputs", "linears", "interface"}  # the CUDA runner's; export adds more
    assert signature_interface(read_signature(tmp_path)) == Interface()
    cpu.interface = Interface(("x", "mask"), {"x": (0, 7)}, None)
    write_signature(tmp_path, cpu.signature())
    assert signature_interface(read_signature(tmp_path)) == cpu.interface
    write_signature(tmp_path, cpu.signature())
    assert read_signature(tmp_path)["arch"] == cpu.arch and read_signature(tmp_path)["features"] == []
