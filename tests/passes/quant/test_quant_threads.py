"""`single_thread`: torch runs on one thread inside the block and gets its count back after."""

from __future__ import annotations

import pytest
import torch

from lowbit.passes.quant.threads import single_thread


def test_one_thread_inside_and_the_count_restored_even_after_an_error() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"), single_thread():
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
