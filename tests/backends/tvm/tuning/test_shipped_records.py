"""The shipped tuning records stay usable: their knob-space version and spec match the kernels as they are now."""

from __future__ import annotations

import json

import pytest

from lowbit.backends.tvm.kernels.arm import a8_linear as arm_a8_linear
from lowbit.backends.tvm.kernels.cuda import a8_linear as cuda_a8_linear
from lowbit.backends.tvm.kernels.cuda import linear as cuda_linear
from lowbit.backends.tvm.kernels.generic import packed_gemm, packed_linear
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.kernels.x86 import a8_linear as x86_a8_linear
from lowbit.backends.tvm.tuning import SHIPPED_DIR
from lowbit.backends.tvm.tuning.database import read_database
from lowbit.backends.tvm.tuning.search import space_version
from lowbit.backends.tvm.tuning.tuner import record_spec

KERNELS = {
    module.KERNEL.name: module.KERNEL
    for module in (x86_a8_linear, arm_a8_linear, cuda_a8_linear, cuda_linear, packed_gemm, packed_linear)
}
RECORDS = [
    (path.name, record)
    for path in sorted(SHIPPED_DIR.glob("*.json"))
    for record in read_database(path, json.loads(path.read_text())["target"]).values()
]


@pytest.mark.parametrize(("file", "record"), RECORDS, ids=[f"{file}:{record.key}" for file, record in RECORDS])
def test_shipped_record_is_found_by_the_kernel_as_it_is(file: str, record) -> None:
    """A record is looked up by (kernel, hash of its knobs, spec): a changed knob space or spec leaves it unused."""
    kernel = KERNELS[record.kernel]
    assert record.space == space_version(kernel.knobs), f"{file}: {record.kernel} knob space changed, re-tune"
    assert record_spec(PackedLinearSpec(**record.spec)) == record.spec
    best = record.best.knobs
    assert set(best) == set(kernel.knobs) and all(best[name] in kernel.knobs[name] for name in best)
