"""The lowbit command line: commands work, errors are one line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lowbit.cli import main


def factory():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    return model.eval(), (torch.randn(2, 32),)


def broken_factory():
    return "not a model"


SPEC = f"{__name__}:factory"


def test_help_reads_well():
    result = subprocess.run([sys.executable, "-m", "lowbit.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "compile", "inspect", "trace", "recipes", "passes"):
        assert command in result.stdout


def test_recipes_and_passes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "w4a16-x86" in out and "w1.58a8-x86" in out and "ready" in out
    assert main(["recipes", "w4a16-arm"]) == 0
    assert "pass: rtn" in capsys.readouterr().out
    assert main(["passes"]) == 0
    assert "rtn" in capsys.readouterr().out


def test_compile_with_pass_options_and_export(capsys, tmp_path):
    assert (
        main(["-q", "compile", SPEC, "--pass", "rtn:bits=8,group_size=16,ignore=[2]", "--export", str(tmp_path / "a")])
        == 0
    )
    out = capsys.readouterr().out
    assert "rtn" in out and "exported to" in out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["passes"] == [{"pass": "rtn", "bits": 8, "group_size": 16, "symmetric": True, "ignore": ["2"]}]
    assert main(["inspect", str(tmp_path / "a"), "--annotated"]) == 0
    assert "w8 g16 sym [rtn]" in capsys.readouterr().out


def test_inspect_after_recipe(capsys):
    assert main(["-q", "inspect", SPEC, "--recipe", "w4a16-x86"]) == 0
    out = capsys.readouterr().out
    assert "w4 g32 sym [rtn]" in out and "w4 g64 sym [rtn]" in out and "linear_packed" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compile", SPEC, "--pass", "rtn:bits=5"], "bits=5 is not supported"),
        (["compile", SPEC, "--pass", "ternery"], "unknown pass 'ternery' (did you mean 'ternary'"),
        (["compile", SPEC, "--pass", "rtn:bits"], "expected KEY=VALUE"),
        (["compile", SPEC, "--recipe", "w9a9-x86"], "w9a9-x86"),
        (["compile", "no_such_model"], "no_such_model"),
        (["compile", "no.such.module:f"], "cannot load model factory"),
        (["compile", f"{__name__}:broken_factory"], "must return"),
        (["recipes", "nope"], "nope"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_trace_reports_each_tracer(capsys):
    assert main(["trace", SPEC]) == 0
    out = capsys.readouterr().out
    assert "fx" in out and "export" in out and "ok" in out
    assert main(["trace", "--list"]) == 0
    assert "minilm" in capsys.readouterr().out


def test_inspect_in_a_fresh_process():
    result = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "-q", "inspect", "resnet18", "--pass", "rtn:bits=8", "--annotated"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "fc_packed" in result.stdout and "w8 g128 sym [rtn]" in result.stdout
