"""A text streamer for ``generate`` that also times the prompt and the decode steps (what ``lowbit generate``
prints): the prefill rate is prompt tokens over the time to the first new token, the decode rate the later
tokens over their time."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch


class TimedTextStreamer:
    """Prints the new text of a one-row generation as it is produced (the prompt is not echoed)."""

    def __init__(self, tokenizer: Any, out: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_tokens = 0
        self.start = self.first = self.last = 0.0

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self.start:
            self.start, self.prompt_tokens = now, int(value.shape[-1])
            return
        self.first = self.first or now
        self.last = now
        self.tokens += [int(t) for t in value.reshape(-1)[:1]]
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()

    def summary(self) -> str:
        prefill = self.prompt_tokens / (self.first - self.start) if self.first > self.start else float("nan")
        later = len(self.tokens) - 1
        decode = later / (self.last - self.first) if later > 0 and self.last > self.first else float("nan")
        return (
            f"prompt {self.prompt_tokens} tokens at {prefill:.1f} tok/s; "
            f"{len(self.tokens)} new tokens, decode {decode:.1f} tok/s"
        )


__all__ = ["TimedTextStreamer"]
