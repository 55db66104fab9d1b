"""lowbit target names map to TVM targets; anything else is a BackendError."""

from __future__ import annotations

import pytest
from tvm.target import Target

from lowbit.backends.tvm.target import float32_lanes, has_features, resolve_target, runs_on_host
from lowbit.errors import BackendError


def test_x86_is_the_detected_host_cpu() -> None:
    target = resolve_target("x86")
    assert target.kind.name == "llvm"
    assert target.attrs["mcpu"] not in ("", "generic")
    assert int(target.attrs["num-cores"]) >= 1
    assert has_features(target, "avx2")
    assert float32_lanes(target) in (8, 16)


def test_arm_has_neon_and_dotprod() -> None:
    target = resolve_target("arm")
    assert target.attrs["mtriple"] == "aarch64-linux-gnu"
    assert set(target.attrs["mattr"]) == {"+neon", "+dotprod"}
    assert "arm_cpu" in target.keys


def test_cuda_defaults_to_sm80_with_x86_host() -> None:
    target = resolve_target("cuda")
    assert target.kind.name == "cuda"
    assert target.attrs["arch"] == "sm_80"
    assert target.host.kind.name == "llvm"


@pytest.mark.parametrize(
    ("spec", "lanes"),
    [
        ({"kind": "llvm", "mcpu": "znver3"}, 8),
        ({"kind": "llvm", "mcpu": "znver4"}, 16),
        ({"kind": "llvm", "mcpu": "x86-64"}, 4),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 4),
    ],
)
def test_float32_lanes_follow_the_cpu(spec: dict, lanes: int) -> None:
    assert float32_lanes(resolve_target(spec)) == lanes


def test_only_host_architecture_targets_run_here() -> None:
    assert runs_on_host(resolve_target("x86"))
    assert runs_on_host(resolve_target({"kind": "llvm"}))
    assert not runs_on_host(resolve_target("arm"))
    assert not runs_on_host(resolve_target("cuda"))


def test_dicts_and_targets_pass_through() -> None:
    spec = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
    assert resolve_target(spec).attrs["mcpu"] == "znver3"
    ready = Target(spec)
    assert resolve_target(ready) is ready


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("riscv", "unknown target 'riscv'"),
        ({"mcpu": "znver3"}, "needs a 'kind'"),
        ({"kind": "no-such-kind"}, "TVM rejected target"),
        (42, "not int"),
    ],
)
def test_bad_targets_raise_backend_error(target: object, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        resolve_target(target)
