"""One text form for a configured pass, ``name:key=value,...``, on the command line and in Python."""

from __future__ import annotations

import pytest

import lowbit
from lowbit.errors import PassConfigError, UnknownPassError
from lowbit.passes.registry import parse_spec


def test_a_spec_gives_the_pass_with_typed_options() -> None:
    rtn = parse_spec("rtn:bits=4,group_size=64,ignore=[lm_head, pooler],symmetric=true")
    expected = lowbit.passes.get("rtn", bits=4, group_size=64, ignore=["lm_head", "pooler"], symmetric=True)
    assert rtn.config == expected.config
    assert parse_spec("rtn").config == lowbit.passes.get("rtn").config


def test_pipelines_take_specs() -> None:
    pipeline = lowbit.Pipeline(["fold_reparam", "rtn:bits=8,group_size=16"])
    assert [p.name for p in pipeline.passes] == ["fold_reparam", "rtn"]
    assert pipeline.passes[1].config.bits == 8 and pipeline.passes[1].config.group_size == 16


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("rtn:bits", PassConfigError, "expected KEY=VALUE, got 'bits'"),
        ("rtn:bits=5", PassConfigError, "bits=5"),
        ("rtm:bits=4", UnknownPassError, "did you mean 'rtn'"),
    ],
)
def test_bad_specs_are_named(spec, error, message) -> None:
    with pytest.raises(error, match=message):
        parse_spec(spec)
