"""lowbit's low-bit TVM kernels against torch fp32 ``F.linear`` and ONNX Runtime, with read bandwidth.

For (M, K, N) in {1, 32} × {(4096, 4096), (4096, 11008), (11008, 4096)}, on one thread
and on all threads, each kernel of `lowbit.backends.tvm.kernels` with its hand schedule:

* ``w2a8``, ``w4a8``: 2/4-bit weights, groups of 128, int8 dynamic per-token activations
  (`a8_linear`, the intrinsic this machine's target picks: VNNI or AVX2);
* ``w1.58a8``: ternary codes {1, 2, 3} (the ``ternary`` pass's layout), one scale per row;
* ``w8a8``: 8-bit weights, one scale per row (the ``w8a8-x86`` recipe's layout);
* ``w4a16``: 4-bit weights, groups of 128, fp32 activations: `packed_linear` at M=1 and the panel
  GEMM `packed_gemm` at M=32, as the lowering picks them.

Peers on the same inputs: torch fp32 ``F.linear`` (ratio torch / lowbit: above 1, lowbit is
faster), ONNX Runtime ``MatMulNBits`` (2-, 4- and 8-bit, block 128: it has no per-row
blocks, so its 8-bit and ternary rows use blocks of 128) with ``accuracy_level=4`` (int8
activations) against the A8 kernels and ``accuracy_level=0`` (fp32) against W4A16, and ORT's int8 path for W8A8 (``DynamicQuantizeLinear`` + ``MatMulInteger``, what
``quantize_dynamic`` emits). These and the "lowbit ms" column run cache-warm: the same
weights every call (a 2-bit 4096×4096 weight is 4 MiB and stays in L3), which a real
decode step, touching every layer once, does not. "lowbit cold" therefore also times each kernel cycling through copies of its
constants (≥ 256 MiB in all), so its weights come from DRAM; "cold GB/s" is the bytes it
must read (packed weights, scales, zero points, activations) over that time.

The memory these cores share with other machines' jobs gives anywhere between half and
all of its bandwidth from one second to the next, so the kernel is compared with reads
timed at the same moments: each repeat times, in turn, the cold kernel, a memory-read
reference and a "same-size read", and the ratios are taken repeat by repeat (their
medians are reported). The reference is the faster of torch's sum over a 512 MiB fp32
tensor and a TVM streaming read of 512 MiB that prefetches ahead as the GEMV does
(`read_func`), so the kernel's own prefetching cannot beat a reference that lacks it.
The same-size read is the faster of torch's sum and the TVM read on buffers of about
the kernel's read bytes, cycling through as many copies as the kernel does: a pure read
of a few MiB per call need not stream like one 512 MiB read. The highest reference
median of the whole run is reported too ("of peak read"), as the bound no moment of
the run exceeded.

Each thread count runs in its own process (TVM sizes its thread pool once, from
``TVM_NUM_THREADS``) on kernels compiled once by the parent. Times are medians over
``--repeats`` repeats, each repeat long enough (≥ 20 ms) to average many calls.

Run: ``python benchmarks/kernels.py`` (``--repeats``, ``--shapes 4096x4096``, ``--kernels
w2a8 w4a16`` to subset). Writes ``benchmarks/results/kernels.json`` and ``kernels.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

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
BANDWIDTH_BYTES = 512 * 2**20
#: Shortest repeat: calls are repeated until one repeat takes at least this long.
MIN_REPEAT_S = 0.02
#: Idle time before each repeat, for the other runtime's spinning worker threads to sleep.
SETTLE_S = 0.02
#: The cold timing cycles through copies of a kernel's constants totalling at least this (beyond the L3 cache).
COLD_BYTES, MAX_COPIES = 256 * 2**20, 64


def case_name(kernel: str, rows: int, k: int, n: int) -> str:
    return f"{kernel.replace('.', '_')}_m{rows}_k{k}_n{n}"


def weights(kernel: str, k: int, n: int, seed: int) -> dict[str, torch.Tensor | None]:
    """Random packed weights of ``kernel``'s format (the values do not change the speed)."""
    from lowbit.ir import packing

    bits, group, _, ternary = KERNELS[kernel]
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(1 if ternary else 0, 4 if ternary else 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    groups = 1 if group is None else k // group
    return {"qweight": packing.pack(codes, bits), "scales": torch.rand(n, groups, generator=gen) * 0.01 + 0.001,
            "zeros": None, "g_idx": None, "bias": None, "act_scale": None}


def build(kernels: list[str], shapes: list[tuple[int, int]], directory: Path) -> list[dict[str, Any]]:
    """Compile every kernel for this machine's x86 target into ``directory`` with its constants; returns the cases."""
    import tvm

    from lowbit.backends.tvm.kernels.generic import packed_gemm, packed_linear
    from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
    from lowbit.backends.tvm.kernels.x86 import a8_linear
    from lowbit.backends.tvm.target import resolve_target

    target = resolve_target("x86")
    tvm.compile(tvm.IRModule({READ_NAME: read_func(BANDWIDTH_BYTES)}), target=target).export_library(
        str(directory / f"{READ_NAME}.so"))
    cases, read_rows = [], set()
    for kernel in kernels:
        bits, group, a8, _ = KERNELS[kernel]
        for rows in ROWS:
            module = a8_linear if a8 else packed_gemm if rows >= packed_gemm.MIN_ROWS else packed_linear
            for k, n in shapes:
                name = case_name(kernel, rows, k, n)
                spec = PackedLinearSpec(rows, k, n, bits, group or k, asymmetric=False, has_bias=False,
                                        act_bits=8 if a8 else None)
                plan = module.KERNEL.plan(spec, weights(kernel, k, n, seed=k + n), target)
                log.info("compiling %s (%s, knobs %s)", name, plan.name, plan.knobs)
                lib = tvm.compile(tvm.IRModule({name: plan.func.with_attr("global_symbol", name)}), target=target)
                lib.export_library(str(directory / f"{name}.so"))
                np.savez(directory / f"{name}.npz", *[t.contiguous().numpy() for t in plan.consts])
                detail = a8_linear.intrinsic(spec, target) if a8 else plan.name
                size_rows = read_task_rows(sum(t.numel() * t.element_size() for t in plan.consts) + rows * k * 4)
                read_rows.add(size_rows)
                cases.append({"kernel": kernel, "M": rows, "K": k, "N": n, "name": name, "knobs": plan.knobs,
                              "detail": detail, "read_rows": size_rows})
    for size_rows in sorted(read_rows):
        tvm.compile(tvm.IRModule({READ_NAME: read_func(size_rows * READ_TASK_ROW_BYTES)}), target=target
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


def read_func(total_bytes: int) -> Any:
    """A PrimFunc summing an int32 buffer ``(tasks, rows, 16, 64)`` into ``(tasks, 64)``: a streaming read
    that prefetches (``prefetchnta``) the next 4 KiB row, one line at a time, like the W2A8 GEMV."""
    from tvm import s_tir, te, tirx

    from lowbit.backends.tvm.kernels.generic.common import prefetch, prepend_to_loop
    from lowbit.backends.tvm.kernels.x86.a8_linear import LINE_BYTES

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
    buffer = next(region.source for region in sch.get(sch.get_sblock("sum_update")).reads
                  if region.source.name == "data")
    last = READ_TASKS * rows * READ_ROW_INTS - 1
    ahead = (task_loop.loop_var * rows + row_loop.loop_var + 1) * READ_ROW_INTS
    prepend_to_loop(sch, sch.get_sref(row_rv), [prefetch(buffer, tirx.min(ahead + line // 4, last))
                                                for line in range(0, READ_ROW_INTS * 4, LINE_BYTES)])
    return sch.mod["main"].with_attr("global_symbol", READ_NAME)


def calls_per_repeat(fn: Callable[[], Any]) -> int:
    """Calls of ``fn`` that take at least `MIN_REPEAT_S` (after a warm-up call)."""
    fn()
    start = time.perf_counter()
    fn()
    return max(1, int(MIN_REPEAT_S / max(time.perf_counter() - start, 1e-7)))


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds per call over ``repeats`` repeats of at least `MIN_REPEAT_S` each."""
    return statistics.median(interleaved_s({"fn": fn}, repeats)["fn"])


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


def read_bandwidth(data: torch.Tensor, tvm_read: Callable[[], Any], repeats: int) -> float:
    """Bytes/s of the faster memory-read bound loop: torch summing ``data`` (the current torch thread count) or
    ``tvm_read``, the TVM streaming read of as many bytes (`read_func`)."""
    times = interleaved_s({"torch": data.sum, "tvm": tvm_read}, repeats)
    return data.numel() * data.element_size() / min(statistics.median(t) for t in times.values())


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


def ort_matmulnbits(x: np.ndarray, bits: int, n: int, threads: int, accuracy_level: int) -> Callable[[], Any]:
    """An ORT session computing ``x · Wᵀ`` with ``MatMulNBits`` (level 4: int8 activations; 0: fp32)."""
    import onnx
    from onnx import TensorProto, helper

    m, k = x.shape
    blocks = k // ORT_BLOCK
    rng = np.random.default_rng(k + n)
    packed = rng.integers(0, 256, size=(n, blocks, ORT_BLOCK * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=ORT_BLOCK, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "matmulnbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializer=[onnx.numpy_helper.from_array(packed, "B"), onnx.numpy_helper.from_array(scales, "scales")])
    return _ort_session(graph, x, threads)


def ort_int8(x: np.ndarray, n: int, threads: int) -> Callable[[], Any]:
    """ORT's dynamic int8 path: ``DynamicQuantizeLinear`` + ``MatMulInteger`` + rescale (per-row weight scales)."""
    import onnx
    from onnx import TensorProto, helper

    m, k = x.shape
    rng = np.random.default_rng(k + n)
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
        nodes, "int8", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializer=[onnx.numpy_helper.from_array(weight, "W"), onnx.numpy_helper.from_array(np.int8(0), "Wz"),
                     onnx.numpy_helper.from_array(scales, "Ws")])
    return _ort_session(graph, x, threads)


def _ort_session(graph: Any, x: np.ndarray, threads: int) -> Callable[[], Any]:
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # onnx 1.23 writes IR 14, which ORT 1.31 refuses
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"A": x})


def worker(directory: Path, cases: list[dict[str, Any]], threads: int, repeats: int) -> dict[str, Any]:
    """Time every case at ``threads`` threads (TVM_NUM_THREADS is set by the parent)."""
    import tvm

    torch.set_num_threads(threads)
    data = torch.ones(BANDWIDTH_BYTES // 4)
    read_lib = tvm.runtime.load_module(str(directory / f"{READ_NAME}.so"))
    read_args = [tvm.runtime.tensor(np.ones((READ_TASKS, BANDWIDTH_BYTES // 4 // READ_TASKS // READ_ROW_INTS,
                                             READ_ROW_INTS // READ_LANES, READ_LANES), dtype="int32")),
                 tvm.runtime.tensor(np.zeros((READ_TASKS, READ_LANES), dtype="int32"))]
    read_lib[READ_NAME](*read_args)
    if int(read_args[1].numpy().sum()) != BANDWIDTH_BYTES // 4:
        raise RuntimeError("the TVM read kernel did not read every element")

    def tvm_read() -> None:
        read_lib[READ_NAME](*read_args)

    bandwidths = [read_bandwidth(data, tvm_read, repeats)]
    log.info("%d thread(s): read bandwidth %.1f GB/s", threads, bandwidths[0] / 1e9)
    gen = torch.Generator().manual_seed(0)
    rows, torch_ms, ort_ms = [], {}, {}
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
        # Copies of the constants, used in turn, so the cold timing reads its weights from DRAM.
        copies = [[tvm.runtime.tensor(t) for t in [x.numpy(), *consts]]
                  for _ in range(min(MAX_COPIES, -(-COLD_BYTES // read)))]
        lowbit_s = median_s(lambda: func(*copies[0], out), repeats)
        size_bytes = case["read_rows"] * READ_TASK_ROW_BYTES
        times = interleaved_s({"cold": cycling(lambda *a: func(*a, out), copies), "torch": data.sum,
                               "tvm": tvm_read, **same_size_reads(directory, case["read_rows"], len(copies))},
                              repeats)
        del copies
        cold_s = statistics.median(times["cold"])
        reference = [BANDWIDTH_BYTES / min(a, b) for a, b in zip(times["torch"], times["tvm"])]
        same_size = [size_bytes / min(a, b) for a, b in zip(times["same_torch"], times["same_tvm"])]
        bandwidths.append(BANDWIDTH_BYTES / min(statistics.median(times["torch"]), statistics.median(times["tvm"])))
        if (m, k, n) not in torch_ms:
            weight = torch.randn(n, k, generator=gen)
            with torch.no_grad():
                torch_ms[(m, k, n)] = median_s(lambda: F.linear(x, weight), repeats) * 1e3
            del weight
        peers = {}
        ort_bits, level = (2 if kernel == "w1.58a8" else bits), (4 if a8 else 0)
        ort_key = (ort_bits, level, m, k, n)
        if ort_key not in ort_ms:
            ort_ms[ort_key] = median_s(ort_matmulnbits(x.numpy(), ort_bits, n, threads, level), repeats) * 1e3
        peers[f"ort_matmulnbits_w{ort_bits}_acc{level}_ms"] = ort_ms[ort_key]
        if kernel == "w8a8":
            peers["ort_int8_matmulinteger_ms"] = median_s(ort_int8(x.numpy(), n, threads), repeats) * 1e3
        row = {**{key: case[key] for key in ("kernel", "M", "K", "N", "detail", "knobs")}, "threads": threads,
               "lowbit_ms": lowbit_s * 1e3, "lowbit_cold_ms": cold_s * 1e3, "torch_fp32_ms": torch_ms[(m, k, n)],
               "speedup_vs_torch": torch_ms[(m, k, n)] / (lowbit_s * 1e3), **peers,
               "read_bytes": read, "lowbit_cold_GBps": read / cold_s / 1e9,
               "read_bandwidth_GBps": statistics.median(reference) / 1e9,
               "fraction_of_read_bandwidth": statistics.median(
                   read / c / r for c, r in zip(times["cold"], reference)),
               "same_size_read_GBps": statistics.median(same_size) / 1e9,
               "fraction_of_same_size_read": statistics.median(
                   read / c / r for c, r in zip(times["cold"], same_size))}
        best_ort = min(peers.values(), default=None)
        if best_ort is not None:
            row["speedup_vs_best_ort"] = best_ort / row["lowbit_ms"]
        log.info("%s, %d thread(s): lowbit %.3f ms, torch %.3f ms%s", case["name"], threads, row["lowbit_ms"],
                 row["torch_fp32_ms"], f", best ORT {best_ort:.3f} ms" if best_ort is not None else "")
        rows.append(row)
    bandwidth = max(bandwidths)
    for row in rows:
        row["fraction_of_peak_read"] = row["read_bytes"] / (row["lowbit_cold_ms"] / 1e3) / bandwidth
    log.info("%d thread(s): read bandwidth %.1f GB/s (highest of %d measurements, lowest %.1f GB/s)", threads,
             bandwidth / 1e9, len(bandwidths), min(bandwidths) / 1e9)
    return {"threads": threads, "peak_read_bandwidth_GBps": bandwidth / 1e9,
            "lowest_read_bandwidth_GBps": min(bandwidths) / 1e9, "rows": rows}


def table(runs: list[dict[str, Any]]) -> str:
    """A markdown table of every row, then each thread count's read bandwidth."""
    header = ("| kernel | M | K | N | thr | lowbit ms | torch fp32 ms | torch/lowbit | ORT MatMulNBits ms | "
              "ORT int8 ms | best ORT/lowbit | lowbit cold ms | cold GB/s | read GB/s | of read | of peak read | "
              "same-size read GB/s | of same-size read |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in runs:
        for r in run["rows"]:
            nbits = next((v for key, v in r.items() if key.startswith("ort_matmulnbits")), None)
            int8 = r.get("ort_int8_matmulinteger_ms")
            versus = r.get("speedup_vs_best_ort")
            lines.append(
                f"| {r['kernel']} | {r['M']} | {r['K']} | {r['N']} | {r['threads']} | {r['lowbit_ms']:.3f} | "
                f"{r['torch_fp32_ms']:.3f} | {r['speedup_vs_torch']:.2f}x | {_opt(nbits)} | {_opt(int8)} | "
                f"{_opt(versus, '{:.2f}x')} | {r['lowbit_cold_ms']:.3f} | {r['lowbit_cold_GBps']:.1f} | "
                f"{r['read_bandwidth_GBps']:.1f} | {r['fraction_of_read_bandwidth']:.0%} | "
                f"{r['fraction_of_peak_read']:.0%} | {r['same_size_read_GBps']:.1f} | "
                f"{r['fraction_of_same_size_read']:.0%} |")
    lines.append("")
    lines += [f"Peak read bandwidth at {run['threads']} thread(s): {run['peak_read_bandwidth_GBps']:.1f} GB/s (the faster of "
              f"torch's sum and a prefetching TVM read, the highest median of the run; the lowest was "
              f"{run['lowest_read_bandwidth_GBps']:.1f} GB/s)" for run in runs]
    lines.append('"read GB/s" is the reference read timed in the same rounds as the kernel\'s cold repeats and '
                 '"of read" the median of the round-by-round ratios (see the script\'s docstring).')
    return "\n".join(lines)


def _opt(value: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if value is None else fmt.format(value)


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
    all_threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        cases = build(args.kernels, shapes, directory)
        (directory / "cases.json").write_text(json.dumps(cases))
        runs = []
        for threads in sorted({1, all_threads}):
            env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "passive"}
            subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--worker", str(directory),
                            str(threads)], env=env, check=True)
            runs.append(json.loads((directory / f"run{threads}.json").read_text()))
    text = table(runs)
    print(text)
    from tvm.target import codegen

    machine = {"cpu": f"{platform.machine()} {codegen.llvm_get_system_cpu()}", "threads": all_threads,
               "torch": torch.__version__, "load_average_1min_at_end": os.getloadavg()[0]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "kernels": {
        name: {"bits": bits, "group_size": group or "per row", "int8_activations": a8, "ternary": ternary}
        for name, (bits, group, a8, ternary) in KERNELS.items() if name in args.kernels}, "runs": runs}, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(
        "# Low-bit kernels vs torch fp32 and ONNX Runtime\n\n"
        f"`python benchmarks/kernels.py` on {machine['cpu']} ({all_threads} threads; load average "
        f"{machine['load_average_1min_at_end']:.1f} at the end: other jobs share the cores), torch {machine['torch']}; "
        "medians of repeats; \"cold\" columns stream the weights from DRAM, the others are cache-warm. "
        "Details in the script's docstring.\n\n" + text + "\n")
    log.info("wrote %s and %s", RESULTS, RESULTS.with_suffix(".md"))


if __name__ == "__main__":
    main()
