"""Int8 convolutions (``conv_packed_a8``) for CUDA: the patch GEMM on ``__dp4a`` and a direct depthwise kernel.

`lowbit.ir.ops_conv` computes each output pixel as the int8 linear of its unfolded patch, so the dp4a kernel of
`kernels.cuda.a8_linear` computes a convolution bit for bit once its input stage packs patch codes instead of a
row's: `CudaA8Conv` reads the NHWC image ``x (B, H, W·C)`` of a `kernels.generic.conv.ConvSpec` (the implicit patch
matrix: row ``b·OH·OW + oh·OW + ow``, columns in the spec's patch order), quantizes each element with the static
step in rounded intrinsics, and packs code 0 where the patch overlaps the padding or lies past the patch (columns
that round it up to whole weight words), so neither the products nor the activation sums of off-centre zero points
see them. The product, its schedule and its epilogue are the linear kernel's.

A depthwise convolution has no reduction over channels to feed ``dp4a``: `CudaA8Depthwise` runs a thread per output
(pixel, channel), channels fastest (coalesced NHWC loads), summing the ``kh·kw`` products of codes and doubled
centred weights ``2·(q − z)`` (half-integer zero points stay exact) in int32, then ``float(2·acc)/2 · scale · Δ``
in rounded multiplies: the reference's one-group epilogue. Planned with an epilogue, both kernels add the bias with a
rounded add (the reference's last step) and apply the activation after the layer (`conv.conv_epilogue`: ReLU,
clamps, hardswish) in their output stage; otherwise the bias and activation are the elementwise kernel that the build
fuses after them. SiLU stays that kernel: the CUDA build computes it with CUDA's ``expf``, not `fast_exp`.
"""

from __future__ import annotations

import torch
from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.cuda.a8_linear import CudaA8Linear, packed_product_compute
from lowbit.backends.tvm.kernels.generic.activations import Arithmetic, clamp_code
from lowbit.backends.tvm.kernels.generic.common import divisor_at_most, finish
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec, clamp_index, conv_epilogue, depthwise_reason
from lowbit.backends.tvm.kernels.spec import KernelPlan, LinearKernel, PackedLinearSpec, Tensors
from lowbit.errors import BackendError
from lowbit.ir import packing

CONV_KERNEL_NAME = "cuda_a8_conv"
DEPTHWISE_KERNEL_NAME = "cuda_a8_depthwise"
#: The largest ``gridDim.y`` of a CUDA launch.
MAX_GRID_Y = 65535
#: Tuning space of the depthwise kernel: threads of a block (one output each).
DEPTHWISE_KNOBS: dict[str, tuple[int, ...]] = {"threads": (64, 128, 256)}
DEPTHWISE_THREADS = 128


class CudaA8Conv(CudaA8Linear):
    """The patch GEMM of the module doc: the dp4a linear kernel on an ungrouped convolution's patches. Its blocks of
    ``m_tile`` output pixels span the grid's y dimension, so ``m_tile`` grows where the pixels need it."""

    name = CONV_KERNEL_NAME
    convolutions = True
    epilogues = True

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        if not isinstance(spec, ConvSpec) or spec.conv_groups != 1:
            return "the dp4a patch kernel takes ungrouped 2-D convolutions"
        if spec.act_dynamic:
            return "the dp4a patch kernel quantizes the image with a static step"
        if _pixel_blocks(spec, max(self.knobs["m_tile"])) > MAX_GRID_Y:
            return f"{spec.batch} output pixels need more than {MAX_GRID_Y} blocks of the grid's y dimension"
        return silu_reason(spec) or super().supports(spec, tensors, target)

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The linear kernel's hand schedule, with the smallest ``m_tile`` from its own on that fits the grid."""
        knobs = super().default_knobs(spec, target)
        tiles = [tile for tile in self.knobs["m_tile"] if tile >= knobs["m_tile"]]
        knobs["m_tile"] = next((tile for tile in tiles if _pixel_blocks(spec, tile) <= MAX_GRID_Y), tiles[-1])
        return knobs

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        if _pixel_blocks(spec, knobs["m_tile"]) > MAX_GRID_Y:
            raise BackendError(
                f"m_tile={knobs['m_tile']} leaves more than {MAX_GRID_Y} blocks of {spec.batch} output pixels"
            )
        return super().build(spec, tensors, target, knobs)

    def compute(self, spec: PackedLinearSpec, has_zz: bool, step: float | None, parts: int) -> tirx.PrimFunc:
        """The unscheduled stages (`a8_conv_compute`): the input stage reads patches of the image."""
        return a8_conv_compute(spec, has_zz, step, parts)


class CudaA8Depthwise(LinearKernel):
    """The depthwise kernel of the module doc."""

    name = DEPTHWISE_KERNEL_NAME
    knobs = DEPTHWISE_KNOBS
    convolutions = True
    epilogues = True

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        reason = depthwise_reason(spec) or silu_reason(spec)
        if reason is not None:
            return reason
        zeros = tensors.get("zeros")
        if zeros is not None and not torch.equal(zeros * 2, torch.round(zeros * 2)):
            return "zero points are not integers or half-integers; the integer sums would be inexact"
        return None

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        return {"threads": DEPTHWISE_THREADS}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """Constants: the doubled centred codes ``2·(q − z)`` ``(kh, kw, C)`` int32, the scales ``(C,)``, [the bias
        ``(C,)``]; the static step is folded into the kernel."""
        codes = packing.unpack(tensors["qweight"], spec.bits, spec.in_features).to(torch.float64)
        zeros = tensors.get("zeros")
        zero = packing.default_zero(spec.bits) if zeros is None else zeros.to(torch.float64)
        twice = torch.round(2 * (codes - zero)).to(torch.int32)
        weights = twice.view(-1, *spec.kernel_size).permute(1, 2, 0).contiguous()
        consts = [weights, tensors["scales"].to(torch.float32).reshape(-1).contiguous()]
        if spec.has_bias:
            consts.append(tensors["bias"].to(torch.float32).reshape(-1).contiguous())
        func = depthwise_func(spec, float(tensors["act_scale"]), knobs["threads"])
        return KernelPlan(func, consts, self.name, knobs)


CONV_KERNEL = CudaA8Conv()
DEPTHWISE_KERNEL = CudaA8Depthwise()
#: The convolution kernels of the CUDA toolchain, in the order the lowering tries them.
KERNELS = (DEPTHWISE_KERNEL, CONV_KERNEL)


def silu_reason(spec: PackedLinearSpec) -> str | None:
    """Why a CUDA kernel does not apply the SiLU of a `ConvSpec` epilogue (`conv.EPILOGUE_STEPS` computes it with
    `fast_exp`, the CPU builds' legalization; the CUDA build's operator calls CUDA's ``expf``), or None."""
    if isinstance(spec, ConvSpec) and any(name == "silu" for name, _ in spec.epilogue):
        return "the CUDA build's SiLU calls expf, not the fast_exp form a fused epilogue computes"
    return None


def image_code(
    x: te.Tensor,
    spec: ConvSpec,
    pixel: tuple[tirx.PrimExpr, tirx.PrimExpr, tirx.PrimExpr],
    channel: tirx.PrimExpr,
    step: float,
    arith: Arithmetic,
) -> tirx.PrimExpr:
    """The int32 code of ``x`` at the padded-image ``pixel`` ``(b, h, w)`` (before removing the padding) and
    ``channel``: ``clamp(rint(x / Δ))``, or 0 in the padding."""
    _, height, width, channels = spec.image
    pad_h, pad_w = spec.padding
    b, h, w = pixel[0], pixel[1] - pad_h, pixel[2] - pad_w
    inside = tirx.all(h >= 0, h < height, w >= 0, w < width)
    # Clamped indices: the load stays in bounds whichever side of the select runs.
    value = x[b, clamp_index(h, height), clamp_index(w, width) * channels + clamp_index(channel, channels)]
    code = clamp_code(arith.rint(arith.fdiv(value, tirx.const(step, "float32"))))
    return tirx.if_then_else(inside, code, tirx.const(0, "int32"))


def output_pixel(spec: ConvSpec, m: tirx.PrimExpr) -> tuple[tirx.PrimExpr, tirx.PrimExpr, tirx.PrimExpr]:
    """``(b, top, left)``: the batch of output row ``m`` and its patch's corner in the padded image."""
    out_h, out_w = spec.out_size
    return m // (out_h * out_w), m // out_w % out_h * spec.stride[0], m % out_w * spec.stride[1]


def a8_conv_compute(
    spec: PackedLinearSpec, has_zz: bool, step: float | None, parts: int = 1, arith: Arithmetic | None = None
) -> tirx.PrimFunc:
    """The patch GEMM unscheduled: ``x (B, H, W·C)``, words, scales, [zz], output ``y (B·OH·OW, N)`` (CUDA
    intrinsics by default; `kernels.generic.activations.PlainArithmetic` runs it on a CPU)."""
    if not isinstance(spec, ConvSpec) or step is None:
        raise ValueError(f"the patch GEMM computes a convolution with a static step, not {spec} (step {step})")
    arith = arith or Arithmetic()
    batch, height, width, channels = spec.image
    kh, kw = spec.kernel_size
    dil_h, dil_w = spec.dilation
    x = te.placeholder((batch, height, width * channels), "float32", name="x")

    def code(m: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
        b, top, left = output_pixel(spec, m)
        if spec.channels_last:
            row, col, channel = k // (kw * channels), k // channels % kw, k % channels
        else:
            channel, row, col = k // (kh * kw), k // kw % kh, k % kw
        value = image_code(x, spec, (b, top + row * dil_h, left + col * dil_w), channel, step, arith)
        if spec.in_features == spec.patch:
            return value
        return tirx.if_then_else(k < spec.patch, value, tirx.const(0, "int32"))  # columns past the patch

    return packed_product_compute(spec, x, None, code, has_zz, step, parts, arith)


def depthwise_compute(spec: ConvSpec, step: float, arith: Arithmetic | None = None) -> tirx.PrimFunc:
    """``x (B, H, W·C)``, doubled centred codes ``(kh, kw, C)``, scales ``(C,)``, [bias ``(C,)``] → ``y (B·OH·OW, C)``
    unscheduled, then the spec's epilogue (`conv.conv_epilogue`)."""
    arith = arith or Arithmetic()
    batch, height, width, channels = spec.image
    kh, kw = spec.kernel_size
    dil_h, dil_w = spec.dilation
    x = te.placeholder((batch, height, width * channels), "float32", name="x")
    weights = te.placeholder((kh, kw, channels), "int32", name="weights")
    scales = te.placeholder((channels,), "float32", name="scales")
    r = te.reduce_axis((0, kh), name="r")
    s = te.reduce_axis((0, kw), name="s")

    def tap(m: tirx.Var, c: tirx.Var) -> tirx.PrimExpr:
        b, top, left = output_pixel(spec, m)
        return image_code(x, spec, (b, top + r * dil_h, left + s * dil_w), c, step, arith) * weights[r, s, c]

    acc = te.compute((spec.batch, channels), lambda m, c: te.sum(tap(m, c), axis=[r, s]), name="acc")
    bias = te.placeholder((channels,), "float32", name="bias") if spec.has_bias else None

    def epilogue(m: tirx.Var, c: tirx.Var) -> tirx.PrimExpr:
        value = acc[m, c].astype("float32") * tirx.const(0.5, "float32")  # exact: a power-of-two rescale
        value = arith.fmul(arith.fmul(value, scales[c]), tirx.const(step, "float32"))
        return conv_epilogue(spec, arith.fadd(value, bias[c]) if bias is not None else value, None)

    y = te.compute((spec.batch, channels), epilogue, name="y")
    return te.create_prim_func([x, weights, scales] + ([bias] if bias is not None else []) + [y])


def depthwise_func(spec: ConvSpec, step: float, threads: int = DEPTHWISE_THREADS) -> tirx.PrimFunc:
    """The scheduled depthwise kernel: outputs (pixel, channel) over a 1-D grid, each thread's sum in registers."""
    sch = s_tir.Schedule(depthwise_compute(spec, step))
    y, acc = sch.get_sblock("y"), sch.get_sblock("acc")
    bx, tx = sch.split(sch.fuse(*sch.get_loops(y)), factors=[None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(acc, tx, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    for loop in sch.get_loops(acc)[-2:]:
        sch.unroll(loop)
    sch.decompose_reduction(acc, sch.get_loops(acc)[-2])
    return finish(sch.mod["main"], None)


def _pixel_blocks(spec: PackedLinearSpec, m_tile: int) -> int:
    """Blocks of output pixels the product launches with ``m_tile`` (as its schedule rounds it to a divisor)."""
    return spec.batch // divisor_at_most(spec.batch, m_tile)


__all__ = [
    "CONV_KERNEL",
    "CONV_KERNEL_NAME",
    "DEPTHWISE_KERNEL",
    "DEPTHWISE_KERNEL_NAME",
    "DEPTHWISE_KNOBS",
    "KERNELS",
    "MAX_GRID_Y",
    "CudaA8Conv",
    "CudaA8Depthwise",
    "a8_conv_compute",
    "depthwise_compute",
    "depthwise_func",
    "image_code",
    "output_pixel",
    "silu_reason",
]
