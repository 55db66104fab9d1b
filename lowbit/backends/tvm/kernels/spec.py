"""The contract between the lowering and the low-bit kernels: a layer's `PackedLinearSpec`, a `KernelPlan`, and
the `LinearKernel` rule every kernel implements.

A kernel is a small declarative rule, in the spirit of TVM dlight's ``ScheduleRule``: it names itself (tuning
records are keyed by the name), declares its knob space, says whether it takes a layer (`LinearKernel.supports`:
None, or the reason it does not), and plans the layer with its hand schedule or given knobs. The lowering walks a
toolchain's ordered kernel list and takes the first kernel that supports the layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tvm import tirx
from tvm.target import Target

from lowbit.errors import BackendError

#: The name of the scalar argument that counts the row blocks of a `PackedLinearSpec.row_blocks` kernel.
ROW_BLOCKS = "row_blocks"
#: The name of the symbolic row count of a `LinearKernel.tail_rows` kernel (its input's first dimension).
ROWS = "rows"
#: A layer's constants by name: ``qweight``, ``scales``, ``zeros``, ``g_idx``, ``bias`` [, ``act_scale``].
Tensors = Mapping[str, "torch.Tensor | None"]


@dataclass(frozen=True)
class PackedLinearSpec:
    """Shape and format of one packed linear call (``batch`` = rows of the flattened input)."""

    batch: int
    in_features: int
    out_features: int
    bits: int
    group_size: int
    asymmetric: bool
    has_bias: bool
    has_g_idx: bool = False
    #: Activation codes of ``linear_packed_a8`` layers (8), None for float activations.
    act_bits: int | None = None
    #: A8 layers: per-token dynamic activation scale (True) or one static step (False).
    act_dynamic: bool = True
    #: A symbolic row count: the kernel runs on any number of whole blocks of ``batch`` rows, the count of blocks
    #: a scalar argument after its inputs (`LinearKernel.symbolic_rows`; the lowering pads the rows to whole blocks),
    #: or on any number of rows, the last block partial (`LinearKernel.tail_rows`: no scalar, no padding).
    row_blocks: bool = False

    @property
    def rows(self) -> tirx.PrimExpr | int:
        """The kernel's row count: ``batch``, or ``blocks · batch`` for `row_blocks` (see `row_block_count`)."""
        return row_block_count() * self.batch if self.row_blocks else self.batch

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def group_bytes(self) -> int:
        return self.group_size // self.codes_per_byte

    @property
    def row_bytes(self) -> int:
        return (self.in_features * self.bits + 7) // 8


@dataclass
class KernelPlan:
    """A kernel ready for ``call_tir``: ``func(x, *consts, y)`` computes the layer.

    ``func`` is scheduled and specialized to the layer's shapes (no ``global_symbol``);
    ``consts`` are the arrays passed after ``x``, in order, already in the kernel's own
    layout; ``name`` is the kernel's name; ``knobs`` are the schedule parameters it was built with.
    """

    func: tirx.PrimFunc
    consts: list[torch.Tensor]
    name: str
    knobs: dict[str, int] = field(default_factory=dict)


def row_block_count() -> tirx.Var:
    """The scalar argument (int64) that counts the row blocks of a `PackedLinearSpec.row_blocks` kernel."""
    return _ROW_BLOCK_VAR


def row_count() -> tirx.Var:
    """The symbolic row count (int64) of a `LinearKernel.tail_rows` kernel: its input's first dimension."""
    return _ROW_VAR


_ROW_BLOCK_VAR = tirx.Var(ROW_BLOCKS, "int64")
_ROW_VAR = tirx.Var(ROWS, "int64")


@dataclass(frozen=True)
class InputNorm:
    """An RMSNorm a kernel applies to each input row before the layer: ``x · rsqrt(mean(x²) + eps) · weight``."""

    weight: torch.Tensor
    eps: float


class LinearKernel(ABC):
    """One low-bit linear kernel: its name, knob space, the layers it takes, and its plan for a layer."""

    #: The name tuning records and `LoweredLinear.kernel` use.
    name: ClassVar[str]
    #: The tuning space: candidate values of each schedule parameter (it contains the hand schedule).
    knobs: ClassVar[dict[str, tuple[int, ...]]]
    #: Whether the kernel also takes a `kernels.generic.conv.ConvSpec` (an int8 convolution's patch GEMM).
    convolutions: ClassVar[bool] = False
    #: Whether the kernel takes a symbolic row count (`PackedLinearSpec.row_blocks`).
    symbolic_rows: ClassVar[bool] = False
    #: Whether, on a symbolic row count, it takes any number of rows (`row_count`), its last block of rows partial,
    #: rather than whole blocks and their count: the lowering then neither pads its input nor cuts its output.
    tail_rows: ClassVar[bool] = False
    #: Whether the kernel applies a `kernels.generic.conv.ConvSpec`'s bias and ``epilogue`` in its output stage.
    epilogues: ClassVar[bool] = False

    @abstractmethod
    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        """Why this kernel cannot take the layer (shape, format, constants, target), or None."""

    @abstractmethod
    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule's knobs for a layer."""

    @abstractmethod
    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """The plan for a supported layer with complete, validated ``knobs``; `BackendError` for knobs that do not
        fit the layer."""

    def gather_rows(
        self, spec: PackedLinearSpec, knobs: Mapping[str, int], count: int, scale_dtype: torch.dtype = torch.float32
    ) -> tirx.PrimFunc | None:
        """A PrimFunc ``(ids (count,) int64, *weight constants, rows (count, in_features) f32)`` that decodes the
        weight rows ``ids`` names from this kernel's constants laid out with ``knobs`` (the leading constants of
        its plan that hold codes, scales [and zero points]; the scales stored as ``scale_dtype``), or None where
        the kernel offers none. An embedding table tied to the layer reads its rows this way, so the table is
        stored once."""
        return None

    def input_norm_reason(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        """Why `normed_plan` cannot compute an RMSNorm of this layer's input in the kernel's input stage; None
        where it can."""
        return "the kernel computes no input norm"

    def normed_plan(
        self,
        spec: PackedLinearSpec,
        tensors: Tensors,
        target: Target,
        norm: InputNorm,
        knobs: Mapping[str, int] | None = None,
    ) -> KernelPlan:
        """`plan` for the layer applied to ``norm`` of its input, the norm computed in the kernel's input stage (its
        weight the last constant), where `input_norm_reason` gives none; `BackendError` otherwise."""
        raise BackendError(f"kernel '{self.name}' cannot take {spec}: {self.input_norm_reason(spec, tensors, target)}")

    def plan(
        self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: Mapping[str, int] | None = None
    ) -> KernelPlan:
        """The scheduled kernel and its constants for one layer, with ``knobs`` over the hand schedule's.

        Raises `BackendError` for a layer the kernel does not support, an unknown knob or a bad value.
        """
        reason = self.supports(spec, tensors, target)
        if reason is not None:
            raise BackendError(f"kernel '{self.name}' cannot take {spec}: {reason}")
        return self.build(
            spec, tensors, target, resolve_knobs(self.knobs, self.default_knobs(spec, target), knobs, self.name)
        )


def resolve_knobs(
    space: Mapping[str, tuple[int, ...]], defaults: Mapping[str, int], knobs: Mapping[str, int] | None, kernel: str
) -> dict[str, int]:
    """``defaults`` overridden by ``knobs``; raises `BackendError` naming an unknown knob or a bad value."""
    chosen = dict(defaults)
    for key, value in (knobs or {}).items():
        if key not in space:
            raise BackendError(f"kernel '{kernel}' has no knob '{key}'; its knobs are {sorted(space)}")
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value not in space[key]):
            raise BackendError(
                f"kernel '{kernel}': knob '{key}' must be a positive int or one of {space[key]}, got {value!r}"
            )
        chosen[key] = value
    return chosen


__all__ = [
    "ROWS",
    "ROW_BLOCKS",
    "InputNorm",
    "KernelPlan",
    "LinearKernel",
    "PackedLinearSpec",
    "Tensors",
    "resolve_knobs",
    "row_block_count",
    "row_count",
]
