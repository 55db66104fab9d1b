"""The pass API: validated frozen configs, the registry, per-layer overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from lowbit import passes
from lowbit.errors import PassConfigError, UnknownPassError
from lowbit.passes import Pass, PassConfig, PassResult, option


@dataclass(frozen=True)
class _Config(PassConfig):
    bits: int = option(4, choices=(2, 3, 4, 8))
    ratio: float = option(0.5, min=0.0, max=1.0)
    scale: float = option(1.0, min=0.0, min_exclusive=True)
    mode: str = option("a", choices=("a", "b"))
    flag: bool = option(False)
    ignore: tuple[str, ...] = option(())
    limit: int | None = option(None, min=1)


class _ConfigPass(Pass):
    name = "api_test_pass"
    Config = _Config

    def run(self, gm, ctx):
        return PassResult(changed=False)


def test_defaults_and_values_are_validated_and_frozen():
    p = _ConfigPass(bits=2, ignore=["lm_head", "re:.*head"], limit=3)
    assert p.config.bits == 2 and p.config.ignore == ("lm_head", "re:.*head") and p.config.limit == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.config.bits = 8


@pytest.mark.parametrize(
    "options, key",
    [
        ({"bits": 5}, "bits=5"),
        ({"ratio": 1.5}, "ratio=1.5"),
        ({"scale": 0.0}, "scale=0.0"),
        ({"mode": "c"}, "mode='c'"),
        ({"bits": "4"}, "bits"),
        ({"flag": 1}, "flag"),
        ({"bits": True}, "bits"),
        ({"limit": 0}, "limit=0"),
        ({"bitz": 4}, "'bitz'"),
    ],
)
def test_bad_options_name_the_key(options, key):
    with pytest.raises(PassConfigError) as info:
        _ConfigPass(**options)
    assert key in str(info.value) and "api_test_pass" in str(info.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(PassConfigError, match="did you mean 'bits'"):
        _ConfigPass(bitz=4)


def test_overrides_exact_name_beats_pattern_and_first_pattern_wins():
    p = _ConfigPass(
        bits=4, overrides={"*.fc*": {"bits": 2}, "block.fc1": {"bits": 8}, "block.*": {"bits": 3}, "head": "skip"}
    )
    assert p.config_for("block.fc1").bits == 8
    assert p.config_for("block.fc2").bits == 2
    assert p.config_for("block.proj").bits == 3
    assert p.config_for("other").bits == 4
    assert p.config_for("head") is None


def test_bad_override_is_rejected_at_construction():
    with pytest.raises(PassConfigError, match="bits=7"):
        _ConfigPass(overrides={"fc1": {"bits": 7}})
    with pytest.raises(PassConfigError, match="must be a mapping"):
        _ConfigPass(overrides={"fc1": 8})


def test_registry_get_and_unknown_names():
    assert "rtn" in passes.available()
    rtn = passes.get("rtn", bits=8)
    assert rtn.name == "rtn" and rtn.config.bits == 8
    with pytest.raises(UnknownPassError, match="did you mean 'rtn'"):
        passes.get("rtm")
    with pytest.raises(PassConfigError, match="bits=5"):
        passes.get("rtn", bits=5)


def test_register_rejects_bad_and_duplicate_names():
    class Bad(_ConfigPass):
        name = "BadName"

    class Dup(_ConfigPass):
        name = "rtn"

    with pytest.raises(ValueError, match="snake_case"):
        passes.register(Bad)
    with pytest.raises(ValueError, match="already registered"):
        passes.register(Dup)
