"""Register tiles on the stack: the TIR pipeline of CPU builds keeps small local buffers as stack allocations.

TVM lowers every local buffer of 1024 bytes or more to a ``TVMBackendAllocWorkspace`` call. A schedule's register
tile (an fp32 convolution's 7 columns × 3 vectors of accumulators are 1344 bytes) then lives in heap memory: each
task allocates, clears (``memset``) and frees it, and the accumulators go through memory between the reduction and
the write-back. `keep_small_buffers_on_stack` marks constant-size local buffers up to `MAX_STACK_BYTES` with TVM's
``disable_lower_builtin`` annotation, so they stay ``alloca``s that LLVM promotes to registers. TVM 0.27 has no
Python statement mutator, so the pass edits the annotation into each function's serialized form. `PIPELINE` names
TVM's default TIR pipeline with this pass before the host finalization.
"""

from __future__ import annotations

import json

import tvm
from tvm import tirx
from tvm.tirx import compilation_pipeline

#: Largest local buffer (bytes) kept on the stack: register tiles, far under a worker thread's stack.
MAX_STACK_BYTES = 8192
#: The TIR pipeline name for `tvm.compile` in CPU builds.
PIPELINE = "lowbit_cpu"
#: TVM's annotation that keeps an allocation out of its builtin lowering (a stack ``alloca``).
KEEP = "disable_lower_builtin"


def _stack_sized(nodes: list[dict], buffer_var: int) -> bool:
    """Whether the buffer behind the ``ir.Var`` node ``buffer_var`` is local, of constant shape, within the limit."""
    ty = nodes[nodes[buffer_var]["data"]["ty"]]
    if ty.get("type") != "tirx.BufferType":
        return False
    data = ty["data"]
    if nodes[data["storage_scope"]].get("data") != "local":
        return False
    dtype = tvm.DataType(nodes[data["dtype"]]["data"]["dtype"])
    size = dtype.bits * dtype.lanes // 8
    for index in nodes[data["shape"]]["data"]:
        dim = nodes[index]
        if dim["type"] != "ir.IntImm":
            return False
        size *= int(nodes[dim["data"]["value"]]["data"])  # the value is an ``int`` node
    return 0 < size <= MAX_STACK_BYTES


def on_stack(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its small local buffers annotated to stay on the stack (itself where it has none)."""
    graph = json.loads(tvm.ir.save_json(func))
    nodes = graph["nodes"]
    allocations = [
        node
        for node in nodes
        if node.get("type") == "tirx.AllocBuffer"
        and not nodes[node["data"]["annotations"]]["data"]
        and _stack_sized(nodes, node["data"]["buffer"])
    ]
    if not allocations:
        return func
    none = next((index for index, node in enumerate(nodes) if node.get("type") == "None"), None)
    if none is None:
        none = len(nodes)
        nodes.append({"type": "None"})
    first = len(nodes)  # the annotation {KEEP: IntImm(int32, 1)}, as LowerTVMBuiltin reads it
    nodes += [
        {"type": "ffi.String", "data": KEEP},
        {"type": "ir.PrimType", "data": {"span": none, "dtype": "int32"}},
        {"type": "int", "data": 1},
        {"type": "ir.IntImm", "data": {"span": none, "ty": first + 1, "value": first + 2}},
        {"type": "ffi.Map", "data": [first, first + 3]},
    ]
    for node in allocations:
        node["data"]["annotations"] = len(nodes) - 1
    return tvm.ir.load_json(json.dumps(graph))


@tvm.transform.module_pass(opt_level=0, name="KeepSmallBuffersOnStack")
def keep_small_buffers_on_stack(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """`on_stack` on every TIR function of ``mod``."""
    updates = {gvar: on_stack(func) for gvar, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)}
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def _pipeline() -> tuple:
    pipeline, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("s_tir")

    def host() -> tvm.transform.Pass:
        return tvm.transform.Sequential([keep_small_buffers_on_stack, finalize_host()])

    return pipeline, host, finalize_device


compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline)

__all__ = ["KEEP", "MAX_STACK_BYTES", "PIPELINE", "keep_small_buffers_on_stack", "on_stack"]
