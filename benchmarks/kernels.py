"""lowbit's low-bit TVM kernels against torch fp32 ``F.linear`` and ONNX Runtime, cold against cold.

For (M, K, N) in {1, 32} × {(4096, 4096), (4096, 11008), (11008, 4096)}, on one thread and on all
threads, each x86 kernel with its hand schedule: ``w2a8``/``w4a8`` (2/4-bit groups of 128, int8 dynamic
per-token activations), ``w1.58a8`` (ternary, one scale per row), ``w8a8`` (8-bit, one scale per row) and
``w4a16`` (4-bit groups of 128, fp32 activations). Each case runs the kernel the x86 lowering picks for it
(GEMVs at M=1; at M=32 the int8 GEMMs, AMX where the CPU has it, and the W4A16 panel GEMM), and its output is
checked against lowbit's torch reference op before it is timed.

Peers on the same inputs and thread count: torch fp32 ``F.linear`` and ONNX Runtime ``MatMulNBits``
(block 128; ``accuracy_level=4``, int8 activations, against the A8 kernels; ``0`` against W4A16), plus
ORT's dynamic int8 path (``DynamicQuantizeLinear`` + ``MatMulInteger``) for W8A8. Every ORT session
shares one global thread pool of the same size as TVM's.

Like for like: every function is timed cold, cycling through copies of its weights (at least 768 MiB,
over twice the 300 MiB L3 cache of the machine the results come from) so weights stream from DRAM, and
warm, reusing one copy (labelled; a few MiB of packed weights stay in cache, which a decode step touching
every layer once does not enjoy). Each round times every function in turn, ratios are taken round by round,
and min/median/max over rounds are stored. Bandwidth is compared with a same-size read (the faster of
torch's sum and a TVM read that prefetches as the GEMVs do, over buffers of the kernel's read bytes, cycled
the same way), timed in the same rounds. The 1-minute load average is
recorded at the start and the end.

Run: ``python benchmarks/kernels.py`` (``--repeats``, ``--shapes 4096x4096``, ``--kernels w2a8 w4a16``).
Writes ``benchmarks/results/kernels.json`` and ``kernels.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("benchmarks.kernels")

RESULTS = Path(__file__).parent / "results" / "kernels.json"
ROWS = (1, 32)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
#: kernel → (weight bits, group size or None for one group per row, int8 activations, ternary codes).
KERNELS: dict[str, tuple[int, int | None, bool, bool]] = {
    "w2a8": (2, 128, True, False),
    "w4a8": (4, 128, True, False),
    "w1.58a8": (2, None, True, True),
    "w8a8": (8, None, True, False),
    "w4a16": (4, 128, False, False),
}
ORT_BLOCK = 128
#: A kernel's output may differ from the torch reference by this much, relative to the reference's largest value.
OUTPUT_TOLERANCE = 1e-4
#: Shortest repeat: calls are repeated until one repeat takes at least this long.
MIN_REPEAT_S = 0.02
#: Idle time before each repeat, for the other runtime's spinning worker threads to sleep.
SETTLE_S = 0.02
#: The cold timing cycles through copies of a kernel's constants totalling at least this (beyond the L3 cache).
COLD_BYTES, MAX_COPIES = 768 * 2**20, 256


def case_name(kernel: str, rows: int, k: int, n: int) -> str:
    return f"{kernel.replace('.', '_')}_m{rows}_k{k}_n{n}"


def weights(kernel: str, k: int, n: int, seed: int) -> dict[str, torch.Tensor | None]:
    """Random packed weights of ``kernel``'s format (the values do not change the speed)."""
    from lowbit.ir import packing

    bits, group, _, ternary = KERNELS[kernel]
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(1 if ternary else 0, 4 if ternary else 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    groups = 1 if group is None else k // group
    return {
        "qweight": packing.pack(codes, bits),
        "scales": torch.rand(n, groups, generator=gen) * 0.01 + 0.001,
        "zeros": None,
        "g_idx": None,
        "bias": None,
        "act_scale": None,
    }


def build(kernels: list[str], shapes: list[tuple[int, int]], directory: Path) -> list[dict[str, Any]]:
    """Compile every kernel for this machine's x86 target into ``directory`` with its constants; returns the cases."""
    import tvm

    from lowbit.backends.tvm.kernels.generic.common import stream_locality
    from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
    from lowbit.backends.tvm.target import resolve_target
    from lowbit.backends.tvm.toolchains import resolve_toolchain

    target = resolve_target("x86")
    toolchain = resolve_toolchain(target)
    cases, read_rows = [], set()
    for kernel in kernels:
        bits, group, a8, _ = KERNELS[kernel]
        for rows in ROWS:
            for k, n in shapes:
                name = case_name(kernel, rows, k, n)
                spec = PackedLinearSpec(
                    rows, k, n, bits, group or k, asymmetric=False, has_bias=False, act_bits=8 if a8 else None
                )
                tensors = weights(kernel, k, n, seed=k + n)
                chosen = next(c for c in toolchain.kernels(spec) if c.supports(spec, tensors, target) is None)
                plan = chosen.plan(spec, tensors, target)
                log.info("compiling %s (%s, knobs %s)", name, plan.name, plan.knobs)
                lib = tvm.compile(tvm.IRModule({name: plan.func.with_attr("global_symbol", name)}), target=target)
                lib.export_library(str(directory / f"{name}.so"))
                np.savez(directory / f"{name}.npz", *[t.contiguous().numpy() for t in plan.consts])
                detail = plan.name
                size_rows = read_task_rows(sum(t.numel() * t.element_size() for t in plan.consts) + rows * k * 4)
                read_rows.add(size_rows)
                cases.append(
                    {
                        "kernel": kernel,
                        "M": rows,
                        "K": k,
                        "N": n,
                        "name": name,
                        "knobs": plan.knobs,
                        "detail": detail,
                        "read_rows": size_rows,
                    }
                )
    for size_rows in sorted(read_rows):
        tvm.compile(
            tvm.IRModule({READ_NAME: read_func(size_rows * READ_TASK_ROW_BYTES, stream_locality(target))}),
            target=target,
        ).export_library(str(directory / f"{READ_NAME}_{size_rows}.so"))
    return cases


#: The TVM read kernel: rows of 4 KiB, summed 64 int32 lanes at a time, split into tasks for the threads.
READ_ROW_INTS, READ_LANES, READ_TASKS = 1024, 64, 64
READ_NAME = "read_bandwidth"
#: Bytes of one row of every task of the read kernel: its reads come in multiples of this.
READ_TASK_ROW_BYTES = READ_TASKS * READ_ROW_INTS * 4


def read_task_rows(nbytes: int) -> int:
    """Rows per task of the read kernel whose read is closest to ``nbytes`` (at least one)."""
    return max(1, round(nbytes / READ_TASK_ROW_BYTES))


def read_func(total_bytes: int, locality: int | None) -> Any:
    """A PrimFunc summing an int32 buffer ``(tasks, rows, 16, 64)`` into ``(tasks, 64)``: a streaming read
    that prefetches the next 4 KiB row, one line at a time, with the GEMVs' hint for this CPU (``locality``,
    `common.stream_locality`; ``prefetchnta`` where it has none)."""
    from tvm import s_tir, te, tirx

    from lowbit.backends.tvm.kernels.generic.common import LINE_BYTES, NTA, prefetch, prepend_to_loop

    rows = total_bytes // (READ_ROW_INTS * 4) // READ_TASKS
    data = te.placeholder((READ_TASKS, rows, READ_ROW_INTS // READ_LANES, READ_LANES), "int32", name="data")
    r = te.reduce_axis((0, rows), name="r")
    j = te.reduce_axis((0, READ_ROW_INTS // READ_LANES), name="j")
    total = te.compute((READ_TASKS, READ_LANES), lambda t, lane: te.sum(data[t, r, j, lane], axis=[r, j]), name="sum")
    sch = s_tir.Schedule(te.create_prim_func([data, total]))
    block = sch.get_sblock("sum")
    task, lane, r_loop, j_loop = sch.get_loops(block)
    sch.reorder(task, r_loop, j_loop, lane)
    sch.parallel(task)
    sch.vectorize(lane)
    sch.unroll(j_loop)
    sch.decompose_reduction(block, r_loop)
    task_rv, row_rv = sch.get_loops(sch.get_sblock("sum_update"))[:2]
    task_loop, row_loop = sch.get(task_rv), sch.get(row_rv)
    buffer = next(
        region.source for region in sch.get(sch.get_sblock("sum_update")).reads if region.source.name == "data"
    )
    last = READ_TASKS * rows * READ_ROW_INTS - 1
    ahead = (task_loop.loop_var * rows + row_loop.loop_var + 1) * READ_ROW_INTS
    prepend_to_loop(
        sch,
        sch.get_sref(row_rv),
        [
            prefetch(buffer, tirx.min(ahead + line // 4, last), NTA if locality is None else locality)
            for line in range(0, READ_ROW_INTS * 4, LINE_BYTES)
        ],
    )
    return sch.mod["main"].with_attr("global_symbol", READ_NAME)


def calls_per_repeat(fn: Callable[[], Any]) -> int:
    """Calls of ``fn`` that take at least `MIN_REPEAT_S` (after a warm-up call)."""
    fn()
    start = time.perf_counter()
    fn()
    return max(1, int(MIN_REPEAT_S / max(time.perf_counter() - start, 1e-7)))


def interleaved_s(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every function, for each of ``repeats`` rounds that run each function's repeat
    (at least `MIN_REPEAT_S`) in turn: round ``i`` of every function saw the same moment of the machine.

    Each repeat starts after `SETTLE_S` idle, so the last function's worker threads have gone to sleep: torch's
    OpenMP workers spinning beside TVM's pool made a 4 MiB torch sum 40× slower (the workers run with
    ``OMP_WAIT_POLICY=passive`` besides, which costs torch's calls a wake-up of microseconds)."""
    numbers = {name: calls_per_repeat(fn) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            fn()
            start = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            times[name].append((time.perf_counter() - start) / numbers[name])
    return times


def cycling(fn: Callable[..., Any], copies: list[list[Any]]) -> Callable[[], Any]:
    """``fn`` called on each of ``copies`` (argument lists) in turn, so none stays in cache."""
    turn = iter(range(1 << 62))
    return lambda: fn(*copies[next(turn) % len(copies)])


def same_size_reads(directory: Path, rows: int, copies: int) -> dict[str, Callable[[], Any]]:
    """The two cold reads of ``rows`` rows per task (`read_task_rows`) of the read kernel, torch's sum and the
    TVM read (`read_func`), each cycling through ``copies`` copies as the kernels' cold timing does."""
    import tvm

    func = tvm.runtime.load_module(str(directory / f"{READ_NAME}_{rows}.so"))[READ_NAME]
    shape = (READ_TASKS, rows, READ_ROW_INTS // READ_LANES, READ_LANES)
    out = tvm.runtime.tensor(np.zeros((READ_TASKS, READ_LANES), dtype="int32"))
    buffers = [[tvm.runtime.tensor(np.ones(shape, dtype="int32")), out] for _ in range(copies)]
    tensors = [[torch.ones(shape)] for _ in range(copies)]
    return {"same_tvm": cycling(func, buffers), "same_torch": cycling(torch.sum, tensors)}


def ort_matmulnbits(x: np.ndarray, bits: int, n: int, accuracy_level: int, seed: int) -> Callable[[], Any]:
    """An ORT session computing ``x · Wᵀ`` with ``MatMulNBits`` (level 4: int8 activations; 0: fp32)."""
    import onnx
    from onnx import TensorProto, helper

    m, k = x.shape
    blocks = k // ORT_BLOCK
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, size=(n, blocks, ORT_BLOCK * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=ORT_BLOCK,
        accuracy_level=accuracy_level,
    )
    graph = helper.make_graph(
        [node],
        "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializer=[onnx.numpy_helper.from_array(packed, "B"), onnx.numpy_helper.from_array(scales, "scales")],
    )
    return _ort_session(graph, x)


def ort_int8(x: np.ndarray, n: int, seed: int) -> Callable[[], Any]:
    """ORT's dynamic int8 path: ``DynamicQuantizeLinear`` + ``MatMulInteger`` + rescale (per-row weight scales)."""
    import onnx
    from onnx import TensorProto, helper

    m, k = x.shape
    rng = np.random.default_rng(seed)
    weight = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    scales = (rng.random(n, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["A"], ["Aq", "As", "Az"]),
        helper.make_node("MatMulInteger", ["Aq", "W", "Az", "Wz"], ["Acc"]),
        helper.make_node("Cast", ["Acc"], ["Accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["As", "Ws"], ["S"]),
        helper.make_node("Mul", ["Accf", "S"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "int8",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializer=[
            onnx.numpy_helper.from_array(weight, "W"),
            onnx.numpy_helper.from_array(np.int8(0), "Wz"),
            onnx.numpy_helper.from_array(scales, "Ws"),
        ],
    )
    return _ort_session(graph, x)


def _ort_session(graph: Any, x: np.ndarray) -> Callable[[], Any]:
    """A session on the process's global ORT thread pool (``set_global_thread_pool_sizes``), all optimizations on."""
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10  # onnx 1.23 writes IR 14, which ORT refuses
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"A": x})


def reference_output(kernel: str, x: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """What ``kernel`` must compute for ``x``: lowbit's torch reference op on the case's packed weights."""
    import lowbit.ir.ops  # noqa: F401  (registers torch.ops.lowbit)
    import lowbit.ir.ops_a8  # noqa: F401

    bits, group, a8, _ = KERNELS[kernel]
    w = weights(kernel, k, n, seed=k + n)
    args = (x, w["qweight"], w["scales"], None, None, None, bits, group or k, k)
    return torch.ops.lowbit.linear_packed_a8(*args, None) if a8 else torch.ops.lowbit.linear_packed(*args)


def spread(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """min / median / max of ``values`` times ``scale``."""
    return {"min": min(values) * scale, "median": statistics.median(values) * scale, "max": max(values) * scale}


def ratios(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """min / median / max of the round-by-round ratios ``numerator[i] / denominator[i]``."""
    return spread([a / b for a, b in zip(numerator, denominator)])


def worker(directory: Path, cases: list[dict[str, Any]], threads: int, repeats: int) -> dict[str, Any]:
    """Time every case at ``threads`` threads (TVM_NUM_THREADS is set by the parent).

    Each round times, in turn: lowbit cold and warm, torch fp32 cold and warm, ONNX Runtime cold and warm,
    and the two same-size reads. Cold functions cycle through copies of their weights (at least
    `COLD_BYTES` in all), so every call streams its weights from DRAM.
    """
    import onnxruntime as ort
    import tvm

    torch.set_num_threads(threads)
    ort.set_global_thread_pool_sizes(threads, 1)  # every ORT session shares one pool, as TVM's kernels do
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in cases:
        kernel, m, k, n = case["kernel"], case["M"], case["K"], case["N"]
        bits, _, a8, _ = KERNELS[kernel]
        x = torch.randn(m, k, generator=gen)
        lib = tvm.runtime.load_module(str(directory / f"{case['name']}.so"))
        with np.load(directory / f"{case['name']}.npz") as saved:
            consts = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        out = tvm.runtime.tensor(np.zeros((m, n), dtype="float32"))
        func = lib[case["name"]]
        read = sum(c.nbytes for c in consts) + x.numel() * 4
        copies = [[tvm.runtime.tensor(t) for t in [x.numpy(), *consts]] for _ in range(cold_copies(read))]
        func(*copies[0], out)
        expected = reference_output(kernel, x, k, n)
        error = float((torch.from_numpy(out.numpy()) - expected).abs().max() / expected.abs().max())
        if error > OUTPUT_TOLERANCE:
            raise RuntimeError(f"{case['name']}: the kernel's output is {error:.2e} (relative) away from the reference")

        torch_weights = [torch.randn(n, k, generator=gen) for _ in range(cold_copies(n * k * 4))]
        ort_bits, level = (2 if kernel == "w1.58a8" else bits), (4 if a8 else 0)
        peer = f"ort_matmulnbits_w{ort_bits}_acc{level}"
        ort_bytes = n * k * ort_bits // 8
        sessions = [ort_matmulnbits(x.numpy(), ort_bits, n, level, seed) for seed in range(cold_copies(ort_bytes))]
        fns = {
            **cold_and_warm("lowbit", with_output(func, out), copies),
            **cold_and_warm("torch", functools.partial(F.linear, x), [[w] for w in torch_weights]),
            **cold_and_warm(peer, call, [[s] for s in sessions]),
            **same_size_reads(directory, case["read_rows"], len(copies)),
        }
        if kernel == "w8a8":
            int8 = [ort_int8(x.numpy(), n, seed) for seed in range(cold_copies(n * k))]
            fns.update(cold_and_warm("ort_int8_matmulinteger", call, [[s] for s in int8]))
        with torch.no_grad():
            times = interleaved_s(fns, repeats)
        size_bytes = case["read_rows"] * READ_TASK_ROW_BYTES
        same_size = [size_bytes / min(a, b) for a, b in zip(times["same_torch"], times["same_tvm"])]
        cold_rate = [read / c for c in times["lowbit_cold"]]
        ort_names = sorted({name.rsplit("_", 1)[0] for name in fns if name.startswith("ort_")})
        row = {
            **{key: case[key] for key in ("kernel", "M", "K", "N", "detail", "knobs")},
            "threads": threads,
            "max_rel_error": error,
            "read_bytes": read,
            "ms": {name: spread(values, 1e3) for name, values in times.items() if not name.startswith("same_")},
            "cold_speedup_vs_torch": ratios(times["torch_cold"], times["lowbit_cold"]),
            "warm_speedup_vs_torch": ratios(times["torch_warm"], times["lowbit_warm"]),
            "cold_speedup_vs_ort": {name: ratios(times[f"{name}_cold"], times["lowbit_cold"]) for name in ort_names},
            "warm_speedup_vs_ort": {name: ratios(times[f"{name}_warm"], times["lowbit_warm"]) for name in ort_names},
            "lowbit_cold_GBps": spread(cold_rate, 1e-9),
            "same_size_read_GBps": spread(same_size, 1e-9),
            "fraction_of_same_size_read": ratios(cold_rate, same_size),
        }
        best = max(ort_names, key=lambda name: row["cold_speedup_vs_ort"][name]["median"] ** -1)
        row["best_ort"] = best
        log.info(
            "%s, %d thread(s): lowbit cold %.3f ms, torch cold %.3f ms, %s cold %.3f ms",
            case["name"],
            threads,
            row["ms"]["lowbit_cold"]["median"],
            row["ms"]["torch_cold"]["median"],
            best,
            row["ms"][f"{best}_cold"]["median"],
        )
        rows.append(row)
    return {"threads": threads, "rows": rows}


def cold_and_warm(name: str, fn: Callable[..., Any], copies: list[list[Any]]) -> dict[str, Callable[[], Any]]:
    """``fn`` timed cold (cycling through ``copies`` of its arguments) and warm (always the first copy)."""
    return {f"{name}_cold": cycling(fn, copies), f"{name}_warm": functools.partial(fn, *copies[0])}


def call(fn: Callable[[], Any]) -> Any:
    return fn()


def with_output(func: Callable[..., Any], out: Any) -> Callable[..., Any]:
    """A TVM kernel called with its inputs, writing into ``out``."""
    return lambda *args: func(*args, out)


def cold_copies(nbytes: int) -> int:
    """Copies of ``nbytes`` of weights that a cold timing cycles through: at least `COLD_BYTES` in all."""
    return max(2, min(MAX_COPIES, -(-COLD_BYTES // nbytes)))


def table(runs: list[dict[str, Any]]) -> str:
    """A markdown table of every row: cold (like for like) first, warm columns labelled as such."""
    header = (
        "| kernel | M | K | N | thr | lowbit cold ms | torch fp32 cold ms | cold ×torch | best ORT | ORT cold ms | "
        "cold ×ORT | cold GB/s | same-size read GB/s | of same-size read | warm lowbit ms | warm ×torch | "
        "warm ×ORT |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in runs:
        for r in run["rows"]:
            ms, best = r["ms"], r["best_ort"]
            lines.append(
                f"| {r['kernel']} | {r['M']} | {r['K']} | {r['N']} | {r['threads']} | "
                f"{_range(ms['lowbit_cold'], '{:.3f}')} | {ms['torch_cold']['median']:.3f} | "
                f"{_range(r['cold_speedup_vs_torch'], '{:.1f}', 'x')} | {best.removesuffix('_ms')} | "
                f"{ms[f'{best}_cold']['median']:.3f} | {_range(r['cold_speedup_vs_ort'][best], '{:.2f}', 'x')} | "
                f"{r['lowbit_cold_GBps']['median']:.1f} | {r['same_size_read_GBps']['median']:.1f} | "
                f"{_range(r['fraction_of_same_size_read'], '{:.0%}')} | {ms['lowbit_warm']['median']:.3f} | "
                f"{r['warm_speedup_vs_torch']['median']:.1f}x | {r['warm_speedup_vs_ort'][best]['median']:.2f}x |"
            )
    lines.append("")
    lines.append(
        "Cold columns cycle every function through copies of its weights (at least 256 MiB), so weights "
        "stream from DRAM for lowbit, torch and ONNX Runtime alike; ratios are taken round by round and "
        "shown as median (min–max). Warm columns reuse one copy (it may stay in cache) and are not like "
        "for like with a DRAM-bound peer."
    )
    return "\n".join(lines)


def _range(stats: dict[str, float], fmt: str, suffix: str = "") -> str:
    return f"{fmt.format(stats['median'])}{suffix} ({fmt.format(stats['min'])}–{fmt.format(stats['max'])})"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shapes", nargs="*", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN pairs")
    parser.add_argument("--kernels", nargs="*", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--worker", nargs=2, metavar=("DIR", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.worker:
        directory, threads = Path(args.worker[0]), int(args.worker[1])
        cases = json.loads((directory / "cases.json").read_text())
        (directory / f"run{threads}.json").write_text(json.dumps(worker(directory, cases, threads, args.repeats)))
        return

    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    load_at_start = os.getloadavg()[0]
    all_threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        cases = build(args.kernels, shapes, directory)
        (directory / "cases.json").write_text(json.dumps(cases))
        runs = []
        for threads in sorted({1, all_threads}):
            env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "passive"}
            subprocess.run(
                [sys.executable, __file__, "--repeats", str(args.repeats), "--worker", str(directory), str(threads)],
                env=env,
                check=True,
            )
            runs.append(json.loads((directory / f"run{threads}.json").read_text()))
    text = table(runs)
    print(text)
    from tvm.target import codegen

    machine = {
        "cpu": f"{platform.machine()} {codegen.llvm_get_system_cpu()}",
        "threads": all_threads,
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine,
                "repeats": args.repeats,
                "kernels": {
                    name: {"bits": bits, "group_size": group or "per row", "int8_activations": a8, "ternary": ternary}
                    for name, (bits, group, a8, ternary) in KERNELS.items()
                    if name in args.kernels
                },
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    load = machine["load_average_1min"]
    RESULTS.with_suffix(".md").write_text(
        "# Low-bit kernels vs torch fp32 and ONNX Runtime\n\n"
        f"`python benchmarks/kernels.py --repeats {args.repeats}` on {machine['cpu']} ({all_threads} threads), "
        f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}; 1-minute load average "
        f"{load['start']:.2f} at the start and {load['end']:.2f} at the end (this run's own threads count in it). "
        "Every kernel's output was checked against lowbit's torch reference. Details in the script's docstring.\n\n"
        + text
        + "\n"
    )
    log.info("wrote %s and %s", RESULTS, RESULTS.with_suffix(".md"))


if __name__ == "__main__":
    main()
