"""Small local buffers stay on the stack in CPU builds: register tiles without workspace calls, same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from tvm import tirx

import lowbit
from lowbit.backends.tvm import stack


def lowered_conv(monkeypatch) -> tirx.PrimFunc:
    """The host function of a compiled 1x1 convolution (a linear on a 14x14 channels-last image, to 48 channels) as
    the pass receives it: its register tile of 7 columns × 3 vectors of 16 floats (1344 bytes, over TVM's own
    1024-byte stack limit) is a local buffer."""
    seen: list[tirx.PrimFunc] = []
    keep = stack.on_stack

    def record(func: tirx.PrimFunc) -> tirx.PrimFunc:
        seen.append(func)
        return keep(func)

    monkeypatch.setattr(stack, "on_stack", record)
    lowbit.compile(nn.Linear(64, 48).eval(), (torch.randn(1, 14, 14, 64),), target="x86", passes=[])
    monkeypatch.setattr(stack, "on_stack", keep)
    (conv,) = [func for func in seen if "conv2d_nhwc_intermediate_local" in func.script()]
    return conv


def test_a_register_tile_over_tvms_stack_limit_is_annotated_to_stay_on_the_stack(monkeypatch) -> None:
    func = lowered_conv(monkeypatch)
    assert stack.KEEP not in func.script()
    kept = stack.on_stack(func)
    assert kept.script().count(stack.KEEP) == 1
    assert stack.on_stack(kept).same_as(kept)  # annotated once


def test_a_buffer_over_the_limit_is_left_alone(monkeypatch) -> None:
    func = lowered_conv(monkeypatch)
    monkeypatch.setattr(stack, "MAX_STACK_BYTES", 1024)
    assert stack.on_stack(func).same_as(func)


def assembly(model: nn.Module, x: torch.Tensor) -> str:
    compiled = lowbit.compile(model.eval(), (x,), target="x86", passes=[])
    with torch.no_grad():
        expected = model(x)
        assert (compiled(x) - expected).norm() / expected.norm() < 1e-5
    return compiled.runner.executable.mod.imports[0].inspect_source("asm")


@pytest.mark.parametrize("keep", [True, False])
def test_a_compiled_pointwise_conv_allocates_no_workspace_for_its_tile(monkeypatch, keep: bool) -> None:
    """With the pass, the ConvNeXt-like layer (a linear on a channels-last image) calls no workspace allocation and
    no ``memset`` per task; without it (the check that the test can fail), it does."""
    if not keep:
        monkeypatch.setattr(stack, "on_stack", lambda func: func)
    torch.manual_seed(0)
    asm = assembly(nn.Linear(64, 192), torch.randn(1, 14, 14, 64))
    assert ("TVMBackendAllocWorkspace" in asm) is not keep
    assert ("memset" in asm) is not keep
