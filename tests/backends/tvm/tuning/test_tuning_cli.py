"""``lowbit compile`` tuning flags: --tune/--no-tune, --tune-trials, --cache-dir, --tune-rpc/--tune-key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.cli import main

MODEL = """
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 32)).eval(), (torch.randn(2, 128),)
"""


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    (tmp_path / "tuning_cli_model.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    return ["compile", "tuning_cli_model:build", "--pass", "rtn:bits=4,group_size=64", "--target", "x86"]


def test_compile_tunes_into_the_cache_dir_once(model, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = model + ["--tune", "--tune-trials", "1", "--cache-dir", str(cache)]
    assert main(args) == 0
    assert "1 kernel signature(s) from the tuning database, 1 candidate(s) measured" in capsys.readouterr().out
    assert list((cache / "tuning").glob("*.json"))
    assert main(args) == 0
    assert "0 candidate(s) measured" in capsys.readouterr().out
    assert main(model + ["--no-tune", "--cache-dir", str(cache)]) == 0
    assert "tuning " not in capsys.readouterr().out  # hand schedules: no tuning line in the report


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tune-key", "phone"], "give the tracker with --tune-rpc"),
        (["--tune-trials", "2"], "add --tune"),
        (["--tune", "--tune-rpc", "no-port"], "HOST:PORT"),
    ],
)
def test_bad_tuning_flags_are_one_line_errors(model, capsys, flags, message):
    assert main(model + flags) == 2
    assert message in capsys.readouterr().err
