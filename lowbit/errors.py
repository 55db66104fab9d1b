"""Errors raised by lowbit. Every error a user can cause derives from `LowbitError`."""

from __future__ import annotations


class LowbitError(Exception):
    """Base class of every error lowbit raises on bad input or unsupported use."""


class TraceError(LowbitError):
    """A model could not be turned into a torch.fx graph."""


class UnknownPassError(LowbitError):
    """A pass name is not registered (or not implemented yet)."""


class PassConfigError(LowbitError):
    """A pass option is unknown, of the wrong type, or out of range."""


class PassOrderError(LowbitError):
    """A pipeline orders passes in a way that would produce a wrong model."""


class RecipeError(LowbitError):
    """A recipe file is missing, malformed or names something that does not exist."""


class CalibrationError(LowbitError):
    """Calibration data is missing, empty or does not match the example inputs."""


class VerificationError(LowbitError):
    """A graph broke an IR invariant (usually a bug in a pass)."""


class BackendError(LowbitError):
    """A backend or target cannot compile, export or run the graph."""


class UnsupportedLayerError(BackendError):
    """``compile(..., strict=True)``: a low-bit layer no kernel of the target takes (it would run dequantized)."""


class BuildTimeoutError(BackendError):
    """Compiling a lowered module took longer than its time limit; the message names the TIR function (the
    operators fused in it) that does not finish, where one does not."""


class ArtifactError(LowbitError):
    """An exported artifact is incomplete, corrupted or built for another target."""


class InputError(LowbitError):
    """A call's input is outside what the compiled model accepts (e.g. a token id outside the vocabulary)."""


class InputShapeError(InputError):
    """An input's batch size is one the compiled graph cannot take (its model ties the batch to a fixed size)."""


class NonFiniteInputError(InputError):
    """A floating-point input holds NaN or Inf; compiled models refuse them on every target (an additive softmax
    mask may hold -inf, see `lowbit.interface.mask_inputs`)."""


class GenerationError(LowbitError):
    """A generation request the compiled causal LM cannot serve (too long, too large a batch, bad options), or a
    model the generation lowering does not know."""
