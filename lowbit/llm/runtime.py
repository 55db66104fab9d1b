"""A compiled decoder driven through the Relax VM: the caches live on the device, steps are padded to the batch.

`TVMDecoder` implements `generate.Decoder` over a library built by `lowbit.llm.lower` (this CPU, or a remote
device through an RPC session). The caches are allocated once, on the device, and only the kernels write them;
a batch smaller than the compiled one runs with padding rows whose mask is all zeros (they attend to nothing and
produce zeros, never NaN). On this CPU a step's inputs and logits cross between torch and TVM through DLPack,
without copies: a SmolLM2 decode step is 2 to 4 ms, and converting through numpy (padding, copies of the inputs
and of the 49152 logits) took about 0.1 ms of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import tvm
from tvm import relax

from lowbit.errors import GenerationError
from lowbit.llm.family import DecoderSpec

#: Byte alignment TVM requires of memory it shares with another framework.
ALIGNMENT = 64


@dataclass(frozen=True)
class DecoderLayout:
    """What a compiled decoder takes: its family spec, batch capacity, context capacity, prefill step sizes."""

    spec: DecoderSpec
    max_batch: int
    max_context: int
    chunks: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spec": self.spec.as_dict(), "chunks": list(self.chunks)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecoderLayout:
        spec = {name: value for name, value in data["spec"].items() if name in DecoderSpec.__dataclass_fields__}
        return cls(DecoderSpec(**spec), int(data["max_batch"]), int(data["max_context"]), tuple(data["chunks"]))


class TVMDecoder:
    """`generate.Decoder` over a compiled decoder library on ``device`` (``tvm.cpu()`` or a remote CPU)."""

    def __init__(self, executable: Any, device: Any, layout: DecoderLayout) -> None:
        self.layout = layout
        self.device = device
        self.vm = relax.VirtualMachine(executable, device)
        #: Whether tensors can be shared with torch in place (this process's CPU, not an RPC session's).
        self.local = device == tvm.cpu()
        self._functions: dict[str, Any] = {}
        self.max_batch, self.max_context, self.chunks = layout.max_batch, layout.max_context, layout.chunks
        self.vocab = layout.spec.vocab
        self._sizes = {1, *self.chunks}
        self._caches: list[Any] = []
        self._batch = 0
        #: The ``last`` input of each column index asked for, on the device, made once.
        self._lasts: dict[int, Any] = {}

    def reset(self, batch: int) -> None:
        if not self._caches:
            spec = self.layout.spec
            shape = (self.max_batch, spec.kv_heads, self.max_context, spec.head_dim)
            zeros = np.zeros(shape, dtype="float32")
            self._caches = [tvm.runtime.tensor(zeros, self.device) for _ in range(2 * spec.layers)]
        self._batch = batch

    def step(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, last: int | None) -> torch.Tensor:
        """Logits of column ``last`` ``(batch, vocab)``, or of every column ``(batch, C, vocab)`` when None."""
        if not self._caches:
            raise GenerationError("reset(batch) must start a batch before its first step")
        batch, chunk = ids.shape
        if chunk not in self._sizes:
            raise GenerationError(f"no compiled step takes {chunk} tokens; the step sizes are {sorted(self._sizes)}")
        rows = self.max_batch - batch
        tensors = [ids.to(torch.int64), positions.to(torch.int64), mask.to(torch.int32)]
        if rows:
            tensors = [torch.nn.functional.pad(tensor, (0, 0, 0, rows)) for tensor in tensors]
        inputs = [self._input(tensor) for tensor in tensors]
        if last is not None:
            if last not in self._lasts:
                self._lasts[last] = self._input(torch.tensor([last], dtype=torch.int64))
            inputs.append(self._lasts[last])
        name = f"{'step' if last is not None else 'all'}_{chunk}"
        if name not in self._functions:
            self._functions[name] = self.vm[name]
        logits = self._functions[name](*inputs, *self._caches)
        logits = torch.from_dlpack(logits) if self.local else torch.from_numpy(logits.numpy())
        return logits[:batch] if rows else logits

    def _input(self, tensor: torch.Tensor) -> Any:
        """``tensor`` on the device: shared in place on this CPU (copied first by torch, whose allocations TVM
        accepts, where it is not contiguous or not aligned: numpy's argmax gives tokens 16-byte aligned)."""
        if not self.local:
            return tvm.runtime.tensor(tensor.contiguous().numpy(), self.device)
        if not tensor.is_contiguous() or tensor.data_ptr() % ALIGNMENT:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        return tvm.runtime.from_dlpack(tensor)


__all__ = ["DecoderLayout", "TVMDecoder"]
