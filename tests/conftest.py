"""Fixtures shared by the whole test tree. Shared model builders live in ``tests/helpers.py``
(importable as ``helpers``: pytest puts ``tests/`` on the path, see ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def arm_emulator() -> None:
    """Skip the test where ARM artifacts cannot run here (no qemu-aarch64 or no emulated aarch64 root)."""
    from lowbit.backends.tvm import qemu  # imported here: loading TVM is slow and most tests never need it

    if (reason := qemu.unavailable_reason()) is not None:
        pytest.skip(reason)
