"""int8 vision models on this CPU: lowbit w8a8-x86 against torch fp32, ONNX Runtime fp32 and ONNX Runtime static int8.

    python benchmarks/vision_cpu.py [--models resnet18 efficientnet_lite0 mobilenet_v3_small] [--threads 1 2]

Each model has random weights (eval mode) and takes one 224×224 image. (MobileNetV3-Small's random initialization
leaves logits near 1e-10, which a static int8 step rounds to zero: its agreement says nothing about int8 accuracy,
its times still hold.) The images are random crops of scikit-image's sample photographs, normalized as ImageNet's;
the first `CALIBRATION` calibrate both int8 engines (lowbit's static convolution steps, ONNX Runtime's
``quantize_static`` in QDQ form with per-channel int8 weights and uint8 activations), the next `EVALUATION` measure
top-1 agreement with torch fp32. One process per thread count (TVM's pool takes its size from ``TVM_NUM_THREADS``
once per process) compiles every engine and times them in interleaved rounds (`lowbit.timing.interleaved`: per turn
an idle, one untimed and one timed call). The machine's int8 peak comes from a ``vpdpbusd`` loop (16 independent zmm
accumulators, compiled with ``cc``), and the int8 convolution kernels of ResNet-18's large 3x3 and 1x1 layers are
timed alone against it. Prints a table and writes min / median / max milliseconds, model bytes, agreement and the
kernel efficiencies, with the load average at the start and the end, to ``benchmarks/results/vision_cpu.json``
(``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

from lowbit.timing import interleaved, spread

MODELS = ("resnet18", "efficientnet_lite0", "mobilenet_v3_small")
RESULTS = Path(__file__).parent / "results" / "vision_cpu.json"
CALIBRATION, EVALUATION = 8, 32
#: (input channels, output channels, size, kernel, stride): ResNet-18's large 3x3 layers and a 1x1 layer.
KERNEL_LAYERS = ((64, 64, 56, 3, 1), (128, 128, 28, 3, 1), (256, 256, 14, 3, 1), (256, 1024, 14, 1, 1))
PEAK_SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(void) {
    __m512i acc[16];
    __m512i a = _mm512_set1_epi32(0x01020304), b = _mm512_set1_epi32(0x01010101);
    for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_epi32(i);
    __asm__ volatile("" : "+v"(a), "+v"(b));
    const long iterations = 20000000;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long n = 0; n < iterations; n++) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    long sum = 0;
    for (int i = 0; i < 16; i++) sum += _mm512_reduce_add_epi32(acc[i]);
    double seconds = (end.tv_sec - start.tv_sec) + 1e-9 * (end.tv_nsec - start.tv_nsec);
    printf("%.6e %ld\n", iterations * 16.0 * 64.0 / seconds, sum);
    return 0;
}
"""


def int8_peak() -> float:
    """Multiply-accumulates per second of one core in a loop of independent ``vpdpbusd`` (best of 3)."""
    with tempfile.TemporaryDirectory() as folder:
        source, binary = Path(folder) / "peak.c", Path(folder) / "peak"
        source.write_text(PEAK_SOURCE)
        subprocess.run(["cc", "-O3", "-mavx512f", "-mavx512vnni", str(source), "-o", str(binary)], check=True)
        return max(float(subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.split()[0])
                   for _ in range(3))  # fmt: skip


def photographs(count: int, seed: int = 0) -> Any:
    """``count`` random 224×224 crops (random scale) of scikit-image's photographs, ImageNet-normalized NCHW."""
    import skimage.data
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    sources = [
        torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
        for name in ("astronaut", "coffee", "chelsea", "rocket", "cat")
    ]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    crops = []
    for _ in range(count):
        image = sources[int(torch.randint(len(sources), (1,), generator=generator))]
        side = int(torch.randint(160, min(image.shape[1:]) + 1, (1,), generator=generator))
        top = int(torch.randint(image.shape[1] - side + 1, (1,), generator=generator))
        left = int(torch.randint(image.shape[2] - side + 1, (1,), generator=generator))
        crop = image[:, top : top + side, left : left + side].unsqueeze(0)
        crops.append((F.interpolate(crop, size=(224, 224), mode="bilinear", align_corners=False)[0] - mean) / std)
    return torch.stack(crops)


def build_model(name: str) -> Any:
    import timm
    import torch
    import torchvision

    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        return plain_batch_norms(timm.create_model(name, pretrained=False)).eval()
    return getattr(torchvision.models, name)(weights=None).eval()


def plain_batch_norms(model: Any) -> Any:
    """timm's fused ``BatchNormAct2d`` (``F.batch_norm`` behind a shape assertion, which TVM's torch importer does not
    take) replaced by ``nn.BatchNorm2d`` then its activation, the same values."""
    import torch.nn as nn
    from timm.layers.norm_act import BatchNormAct2d

    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, BatchNormAct2d):
                norm = nn.BatchNorm2d(child.num_features, child.eps, child.momentum)
                norm.load_state_dict(child.state_dict())
                setattr(parent, child_name, nn.Sequential(norm, child.drop, child.act))
    return model


def onnx_engines(model: Any, calibration: Any, folder: Path, threads: int) -> dict[str, tuple[Any, int]]:
    """ONNX Runtime fp32 and static int8 (QDQ, per-channel int8 weights, uint8 activations): run functions and
    model bytes."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp32, int8 = folder / "model.onnx", folder / "model_int8.onnx"
    torch.onnx.export(model, (calibration[:1],), str(fp32), input_names=["x"], opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": calibration[i : i + 1].numpy()} for i in range(len(calibration))])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    quantize_static(
        str(fp32),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    engines = {}
    for label, path in (("onnxruntime_fp32", fp32), ("onnxruntime_int8", int8)):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(x: Any, session: Any = session) -> Any:
            return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])

        engines[label] = (run, path.stat().st_size)
    return engines


def worker(models: list[str], threads: int, repeats: int) -> list[dict[str, Any]]:
    """Compile and time every engine for ``models`` in this process, at ``threads`` threads."""
    import torch

    import lowbit

    torch.set_num_threads(threads)
    images = photographs(CALIBRATION + EVALUATION)
    calibration, evaluation = images[:CALIBRATION], images[CALIBRATION:]
    rows = []
    for name in models:
        model = build_model(name)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            compiled = lowbit.compile(
                model,
                (calibration[:1],),
                recipe="w8a8-x86",
                calibration=[(calibration[i : i + 1],) for i in range(CALIBRATION)],
                target="x86",
                tune=False,
            )
            compile_s = time.perf_counter() - start
            exported = compiled.export(Path(folder) / "lowbit")
            lowbit_bytes = sum(p.stat().st_size for p in exported.rglob("*") if p.is_file())
            engines = {"torch_fp32": (model, sum(p.numel() * p.element_size() for p in model.state_dict().values()))}
            engines.update(onnx_engines(model, calibration, Path(folder), threads))
            engines["lowbit_w8a8"] = (compiled, lowbit_bytes)
            agreement = {}
            with torch.no_grad():
                reference = torch.cat([model(evaluation[i : i + 1]) for i in range(EVALUATION)]).argmax(dim=1)
                for label, (engine, _) in engines.items():
                    top1 = torch.cat([engine(evaluation[i : i + 1]) for i in range(EVALUATION)]).argmax(dim=1)
                    agreement[label] = float((top1 == reference).float().mean())
                image = evaluation[:1]
                times = interleaved({label: partial(engine, image) for label, (engine, _) in engines.items()}, repeats)
        row = {
            "model": name,
            "threads": threads,
            "compile_s": compile_s,
            "conv_fallbacks": [item for item in compiled.report.fallbacks if "convolution" in item],
            "engines": {
                label: {"ms": spread(times[label]), "bytes": size, "top1_agreement": agreement[label]}
                for label, (_, size) in engines.items()
            },
        }
        lowbit_ms = median(times["lowbit_w8a8"])
        row["speedup_vs_torch_fp32"] = median(times["torch_fp32"]) / lowbit_ms
        row["speedup_vs_onnxruntime_int8"] = median(times["onnxruntime_int8"]) / lowbit_ms
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def kernel_efficiency() -> tuple[float, list[dict[str, Any]]]:
    """The ``vpdpbusd`` peak of one core, and ResNet-18's large int8 convolution layers, their kernel alone at one
    thread (hand schedule), against it (measured right after, the load on a shared machine moves both)."""
    import torch
    from tvm.target import Target

    from lowbit.backends.tvm.kernels.generic.conv import ConvSpec, patch_weight
    from lowbit.backends.tvm.kernels.x86 import a8_gemm
    from lowbit.backends.tvm.target import x86_host_target
    from lowbit.backends.tvm.tuning.measure import LocalRunner
    from lowbit.ir import packing

    target = Target(x86_host_target())
    runner = LocalRunner(target)
    peak = int8_peak()
    rows = []
    for channels, out, size, kernel, stride in KERNEL_LAYERS:
        pad, patch = kernel // 2, channels * kernel * kernel
        side = (size + 2 * pad - kernel) // stride + 1
        spec = ConvSpec(
            batch=side * side, in_features=patch, out_features=out, bits=8, group_size=patch, asymmetric=False,
            has_bias=False, act_bits=8, act_dynamic=False, image=(1, size, size, channels), out_size=(side, side),
            kernel_size=(kernel, kernel), stride=(stride, stride), padding=(pad, pad), dilation=(1, 1),
        )  # fmt: skip
        codes = torch.randint(0, 256, (out, patch), dtype=torch.uint8)
        tensors = {
            "qweight": patch_weight(packing.pack(codes, 8), None, 8, channels, (kernel, kernel), patch, True),
            "scales": torch.rand(out, 1), "zeros": None, "g_idx": None, "bias": None, "act_scale": torch.tensor(0.05),
        }  # fmt: skip
        plan = a8_gemm.KERNEL.plan(spec, tensors, target)
        seconds = runner.measure(plan.func, plan.consts).seconds
        macs = side * side * patch * out
        rows.append(
            {
                "layer": f"{channels}->{out} {kernel}x{kernel} at {size}x{size}",
                "ms": seconds * 1e3,
                "gmac_per_s": macs / seconds / 1e9,
                "fraction_of_peak": macs / seconds / peak,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return peak, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the thread count of a worker process
    parser.add_argument("--kernels", action="store_true", help=argparse.SUPPRESS)  # the kernel-efficiency worker
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.models, args.worker, args.repeats)))
        return
    if args.kernels:
        print(json.dumps(kernel_efficiency()))
        return
    load_start = os.getloadavg()
    rows = []
    for threads in args.threads:
        command = [sys.executable, __file__, "--worker", str(threads), "--repeats", str(args.repeats), "--models"]
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        done = subprocess.run(command + args.models, env=env, check=True, stdout=subprocess.PIPE, text=True)
        rows += json.loads(done.stdout.splitlines()[-1])
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--kernels"], env=env, check=True, stdout=subprocess.PIPE, text=True
    )
    peak, kernels = json.loads(done.stdout.splitlines()[-1])
    load_end = os.getloadavg()
    labels = ("torch_fp32", "onnxruntime_fp32", "onnxruntime_int8", "lowbit_w8a8")
    print(f"{'model':20s} {'threads':>7s} " + " ".join(f"{label:>17s}" for label in labels) + "  vs torch  vs ORT int8")
    for row in rows:
        cells = " ".join(
            f"{row['engines'][label]['ms']['median']:9.2f} ms {row['engines'][label]['top1_agreement']:4.2f}"
            for label in labels
        )
        print(
            f"{row['model']:20s} {row['threads']:7d} {cells} {row['speedup_vs_torch_fp32']:8.2f}x "
            f"{row['speedup_vs_onnxruntime_int8']:8.2f}x"
        )
    print(f"int8 peak of one core (vpdpbusd loop): {peak / 1e9:.1f} GMAC/s")
    for kernel in kernels:
        print(f"  {kernel['layer']:32s} {kernel['gmac_per_s']:7.1f} GMAC/s ({kernel['fraction_of_peak']:.0%} of peak)")
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "load_average_start": load_start,
        "load_average_end": load_end,
        "int8_peak_mac_per_s": peak,
        "kernels": kernels,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
