"""Recipes: shipped schemes, loading by name and path, validation messages, per-layer overrides."""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml

import lowbit
from lowbit import recipes
from lowbit.errors import BackendError, RecipeError
from lowbit.ir import ops_a8
from lowbit.ir.annotations import get_meta
from lowbit.passes import Pass, PassConfig, option, registry
from lowbit.recipes import PassSpec, TuneOptions, schema

from helpers import LMHeadMLP

SCHEMES = ("w2a8", "w4a8", "w4a16", "w8a8", "w1.58a8")
SHIPPED = sorted(f"{scheme}-{target}" for scheme in SCHEMES for target in ("x86", "arm", "cuda"))
#: The shipped recipes as they were written before the schemes: one file per recipe in the one-target format.
SINGLE_TARGET = Path(__file__).parent / "single_target"


@dataclass(frozen=True)
class _TestConfig(PassConfig):
    bits: int = option(4, choices=(2, 3, 4, 8))
    group_size: int = option(128, min=-1)


class _AnyStagePass(Pass):
    """A do-nothing pass that may appear in either stage."""

    name = "recipe_test_pass"
    Config = _TestConfig
    stage = "any"


class _PreparePass(Pass):
    """A do-nothing training-time pass."""

    name = "recipe_test_prepare"
    Config = _TestConfig
    stage = "prepare"


@pytest.fixture(autouse=True)
def _test_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the test passes for one test only, so other test modules never see them."""
    for cls in (_AnyStagePass, _PreparePass):
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)


def _write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
    name: mine
    description: test recipe
    target: x86
    tune: {trials: 8, max_seconds: 30, database: tuning.db}
    prepare:
      - {pass: recipe_test_prepare, bits: 8}
    convert:
      - pass: recipe_test_pass
        bits: 4
        overrides:
          "classifier": skip
          "*.attention.*": {group_size: 64}
"""


# --- shipped recipes ---------------------------------------------------------------------------


def test_available_lists_every_target_of_every_shipped_scheme() -> None:
    files = sorted(entry.name for entry in resources.files("lowbit.recipes").iterdir() if entry.name.endswith(".yaml"))
    assert files == sorted(f"{scheme}.yaml" for scheme in SCHEMES)
    assert recipes.available() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads(name: str) -> None:
    recipe = recipes.load(name)
    assert recipe.name == name
    assert recipe.target == name.rsplit("-", 1)[1]
    assert recipe.path.name == f"{name.rsplit('-', 1)[0]}.yaml"
    assert recipe.build("prepare") == []
    assert [p.name for p in recipe.build("convert")] == [spec.name for spec in recipe.convert]
    assert recipes.status()[name] == "ready"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_equals_its_one_target_file(name: str) -> None:
    """Each scheme's target part gives the recipe its own file used to give: same description, target, tuning
    and passes (CUDA recipes lost their tuning block, which the backend always refused)."""
    recipe = recipes.load(name)
    single = recipes.load(SINGLE_TARGET / f"{name}.yaml")  # users' files in the one-target format still load
    assert single.name == name
    if recipe.target == "cuda":
        assert recipe.tune == TuneOptions() and single.tune == TuneOptions(trials=128, max_seconds=900)
        single = dataclasses.replace(single, tune=recipe.tune)
    assert dataclasses.replace(recipe, path=single.path) == single


@pytest.mark.parametrize("target", ["x86", "arm", "cuda"])
def test_w4a16_is_ready_with_rtn(target: str) -> None:
    fold, rtn, _ = recipes.load(f"w4a16-{target}").build("convert")
    assert fold.name == "fold_batchnorm"
    config = rtn.config.as_dict()
    assert (config["bits"], config["group_size"], config["symmetric"]) == (4, 128, True)
    assert tuple(config["ignore"]) == ("lm_head",)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_pack_embeddings_after_the_weights_and_keep_the_weight_pass_off_lm_head(name: str) -> None:
    """Token embeddings (and a tied lm_head) get llama.cpp Q8_0-like tables after the weight quantizer (which ignores
    lm_head); in int8-activation recipes the activation pass runs last, so the tied lm_head takes int8
    activations like every other linear."""
    passes = recipes.load(name).build("convert")
    names = [p.name for p in passes]
    embeddings = passes[names.index("quantize_embeddings")].config.as_dict()
    assert (embeddings["bits"], embeddings["group_size"], embeddings["symmetric"], embeddings["tied_output"]) == (
        8,
        32,
        True,
        True,
    )
    assert names.index("quantize_embeddings") == 2
    assert names[-1] == ("quantize_activations" if "quantize_activations" in names else "quantize_embeddings")
    assert tuple(passes[1].config.as_dict()["ignore"]) == ("lm_head",)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_fold_batch_norms_before_the_weight_quantizer(name: str) -> None:
    assert recipes.load(name).build("convert")[0].name == "fold_batchnorm"


def test_rtn_option_error_names_file_key_path_and_choices(tmp_path: Path) -> None:
    path = _write(tmp_path, "target: x86\nconvert: [{pass: rtn, bits: 5, group_size: 128}]\n", name="w4a16-x86.yaml")
    with pytest.raises(RecipeError) as info:
        recipes.load(path)
    assert str(info.value) == f"{path}: convert[0].bits: rtn: bits=5 is not supported; choose one of 2, 3, 4, 8"


def test_every_shipped_recipe_is_ready() -> None:
    assert recipes.status() == {name: "ready" for name in SHIPPED}


#: Relative output error bound on the small MLP per weight scheme (int8 activations everywhere).
A8_ERROR_BOUND = {"w8a8": 0.03, "w4a8": 0.2, "w2a8": 0.6, "w1.58a8": 0.7}


@pytest.mark.parametrize("name", [name for name in SHIPPED if not name.startswith("w4a16")])
def test_int8_activation_recipes_compile_and_run_on_torch(name: str) -> None:
    torch.manual_seed(0)
    model = LMHeadMLP(64, 128, 128, 16).eval()
    x = torch.randn(8, 64)
    calibration = [(torch.randn(32, 64),) for _ in range(4)]
    compiled = lowbit.compile(model, (x,), recipe=name, target="torch", calibration=calibration)
    a8 = [n for n in compiled.graph.graph.nodes if n.target is ops_a8.linear_packed_a8]
    assert [get_meta(n).layer for n in a8] == ["fc1", "fc2"]
    assert all(get_meta(n).quant.act_bits == 8 for n in a8)
    assert isinstance(compiled.graph.get_submodule("lm_head"), torch.nn.Linear)  # ignored by the recipe
    assert compiled.report.rel_error < A8_ERROR_BOUND[name.split("-")[0]]
    assert torch.isfinite(compiled(x)).all()


def test_every_shipped_recipe_reports_a_status() -> None:
    status = recipes.status()
    assert sorted(status) == SHIPPED
    assert all(value == "ready" or value.startswith(f"{name}.yaml: ") for name, value in status.items())


def test_package_data_is_installed_and_loads_through_importlib_resources() -> None:
    for scheme in SCHEMES:
        resource = resources.files("lowbit.recipes") / f"{scheme}.yaml"
        assert resource.is_file(), f"{scheme}.yaml is not installed as package data"
        data = yaml.safe_load(resource.read_text())
        assert data["name"] == scheme and sorted(data["targets"]) == ["arm", "cuda", "x86"]
        with resources.as_file(resource) as path:
            assert schema.parse_scheme(data, path, "x86").name == f"{scheme}-x86"


@pytest.mark.parametrize("name", ["w4a8-cuda", "w4a16-cuda"])
def test_tuning_a_cuda_recipe_keeps_the_backends_refusal(name: str) -> None:
    torch.manual_seed(0)
    model = LMHeadMLP(64, 128, 128, 16).eval()
    calibration = [(torch.randn(8, 64),) for _ in range(2)]
    with pytest.raises(BackendError, match="tuning CUDA kernels is not supported"):
        lowbit.compile(model, (torch.randn(2, 64),), recipe=name, calibration=calibration, tune=True)


# --- loading by path ---------------------------------------------------------------------------


def test_load_by_path_builds_both_stages(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    recipe = recipes.load(str(path))
    assert recipe == recipes.load(path)
    assert (recipe.name, recipe.description, recipe.path, recipe.target) == ("mine", "test recipe", path, "x86")
    assert recipe.tune == TuneOptions(trials=8, max_seconds=30, database="tuning.db")
    assert recipe.prepare == (PassSpec("recipe_test_prepare", {"bits": 8}, {}, "prepare", "prepare[0]"),)
    (prepare,) = recipe.build("prepare")
    (convert,) = recipe.build("convert")
    assert isinstance(prepare, _PreparePass) and prepare.config.bits == 8
    assert isinstance(convert, _AnyStagePass) and convert.config.bits == 4
    assert recipe.build("convert")[0] is not convert


def test_defaults_for_optional_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "target: cuda\nconvert: [{pass: recipe_test_pass}]\n", name="bare.yaml")
    recipe = recipes.load(path)
    assert (recipe.name, recipe.description, recipe.prepare) == ("bare", "", ())
    assert recipe.tune == TuneOptions()


def test_target_dict_and_with_target(tmp_path: Path) -> None:
    path = _write(tmp_path, "target: {kind: llvm, mcpu: znver3}\nconvert: []\n")
    recipe = recipes.load(path)
    assert dict(recipe.target) == {"kind": "llvm", "mcpu": "znver3"}
    moved = recipe.with_target("arm")
    assert moved.target == "arm" and moved.convert == recipe.convert and dict(recipe.target)["kind"] == "llvm"


def test_recipe_is_frozen(tmp_path: Path) -> None:
    recipe = recipes.load(_write(tmp_path, GOOD))
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.target = "arm"  # type: ignore[misc]
    with pytest.raises(TypeError):
        recipe.convert[0].options["bits"] = 2  # type: ignore[index]


def test_build_rejects_an_unknown_stage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stage"):
        recipes.load(_write(tmp_path, GOOD)).build("deploy")


# --- per-layer overrides -----------------------------------------------------------------------


def test_override_precedence_exact_beats_pattern_and_first_pattern_wins(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        target: x86
        convert:
          - pass: recipe_test_pass
            bits: 4
            overrides:
              "layers.*.attention.*": {group_size: 64}
              "layers.*": {bits: 8}
              "re:layers\\\\.0\\\\..*": {bits: 2}
              "layers.0.attention.q": {group_size: 32}
              "classifier": skip
    """,
    )
    (p,) = recipes.load(path).build("convert")
    assert p.config_for("layers.0.attention.q").as_dict() == {"bits": 4, "group_size": 32}  # exact beats patterns
    assert p.config_for("layers.0.attention.k").as_dict() == {"bits": 4, "group_size": 64}  # first pattern wins
    assert p.config_for("layers.0.mlp").as_dict() == {"bits": 8, "group_size": 128}  # glob listed before the regex
    assert p.config_for("classifier") is None
    assert p.config_for("embed").as_dict() == {"bits": 4, "group_size": 128}


# --- validation errors -------------------------------------------------------------------------

BAD = {
    "syntax": ("target: x86\nconvert: [\n", "line 3"),
    "duplicate key": ("target: x86\ntarget: arm\nconvert: []\n", "line 2: invalid YAML: duplicate key 'target'"),
    "top level": ("- just\n- a list\n", "<top level>: a recipe is a mapping"),
    "empty": ("", "<top level>: a recipe is a mapping"),
    "unknown key": ("target: x86\nconvert: []\nconvret: []\n", "convret: unknown key; did you mean 'convert'?"),
    "missing convert": ("target: x86\nprepare: []\n", "convert: missing"),
    "missing target": ("convert: []\n", "target: missing"),
    "convert not a list": ("target: x86\nconvert: {pass: rtn}\n", "convert: must be a list"),
    "prepare not a list": ("target: x86\nprepare: lora\nconvert: []\n", "prepare: must be a list"),
    "entry not a mapping": ("target: x86\nconvert: [rtn]\n", "convert[0]: a pass entry is a mapping"),
    "entry without pass": ("target: x86\nconvert: [{bits: 4}]\n", "convert[0]: missing the 'pass' key"),
    "pass not a name": ("target: x86\nconvert: [{pass: 4}]\n", "convert[0].pass: must be a pass name"),
    "unknown pass": (
        "target: x86\nconvert: [{pass: recipe_test_pas}]\n",
        "convert[0].pass: unknown pass 'recipe_test_pas' (did you mean 'recipe_test_pass'",
    ),
    "bad option value": (
        "target: x86\nconvert: [{pass: recipe_test_pass, bits: 5}]\n",
        "convert[0].bits: recipe_test_pass: bits=5 is not supported; choose one of 2, 3, 4, 8",
    ),
    "bad option type": (
        "target: x86\nconvert: [{pass: recipe_test_pass, bits: four}]\n",
        "convert[0].bits: recipe_test_pass: bits must be an integer",
    ),
    "unknown option": (
        "target: x86\nconvert: [{pass: recipe_test_pass, bitz: 4}]\n",
        "convert[0].bitz: recipe_test_pass: unknown option 'bitz' (did you mean 'bits'?)",
    ),
    "overrides not a mapping": (
        "target: x86\nconvert: [{pass: recipe_test_pass, overrides: [fc]}]\n",
        "convert[0].overrides: must be a mapping",
    ),
    "override value": (
        "target: x86\nconvert: [{pass: recipe_test_pass, overrides: {fc: skp}}]\n",
        "convert[0].overrides['fc']: must be 'skip' or a mapping of options, got 'skp'",
    ),
    "override option": (
        "target: x86\nconvert: [{pass: recipe_test_pass, overrides: {fc: {bits: 5}}}]\n",
        "convert[0].overrides['fc'].bits: recipe_test_pass: bits=5 is not supported",
    ),
    "override regex": (
        "target: x86\nconvert: [{pass: recipe_test_pass, overrides: {'re:(': skip}}]\n",
        "convert[0].overrides['re:(']: invalid regular expression",
    ),
    "unknown target": ("target: x68\nconvert: []\n", "target: unknown target 'x68'"),
    "target dict without kind": ("target: {mcpu: znver3}\nconvert: []\n", "target: a target dict needs a 'kind'"),
    "tune not a mapping": ("target: x86\ntune: 64\nconvert: []\n", "tune: must be a mapping"),
    "tune unknown key": (
        "target: x86\ntune: {trails: 64}\nconvert: []\n",
        "tune.trails: unknown key; did you mean 'trials'?",
    ),
    "tune trials": ("target: x86\ntune: {trials: -1}\nconvert: []\n", "tune.trials: must be an integer >= 0"),
    "tune trials bool": ("target: x86\ntune: {trials: true}\nconvert: []\n", "tune.trials: must be an integer >= 0"),
    "tune max_seconds": (
        "target: x86\ntune: {max_seconds: 0}\nconvert: []\n",
        "tune.max_seconds: must be a number > 0",
    ),
    "tune database": ("target: x86\ntune: {database: 3}\nconvert: []\n", "tune.database: must be a path or null"),
    "wrong stage": (
        "target: x86\nconvert: [{pass: recipe_test_prepare}]\n",
        "convert[0].pass: 'recipe_test_prepare' is a prepare-stage pass; list it under 'prepare'",
    ),
    "description": ("description: [a, b]\ntarget: x86\nconvert: []\n", "description: must be a string"),
    "targets by path": ("targets: {x86: {}}\nconvert: []\n", "targets: a recipe file loaded by path is for one target"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_names_file_and_key_path(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        recipes.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_pass_config_error_is_chained(tmp_path: Path) -> None:
    path = _write(tmp_path, "target: x86\nconvert: [{pass: recipe_test_pass, bits: 5}]\n")
    with pytest.raises(RecipeError) as info:
        recipes.load(path)
    assert type(info.value.__cause__).__name__ == "PassConfigError"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found") as info:
        recipes.load(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_unknown_name_lists_close_matches_and_available() -> None:
    with pytest.raises(RecipeError) as info:
        recipes.load("w4a16-x68")
    message = str(info.value)
    assert message.startswith("w4a16-x68.yaml: ")
    assert "did you mean 'w4a16-x86'" in message
    assert "available: " + ", ".join(SHIPPED) in message


# --- schemes: shared passes, one part per target ---------------------------------------------

SCHEME = """\
    name: w4a16
    description: "test scheme for {target}"
    convert:
      - {pass: recipe_test_pass, bits: 4}
    targets:
      x86: {description: x86 CPUs, tune: {trials: 8}}
      arm:
      cuda: {description: GPUs}
"""


def _parse_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, target: str) -> recipes.Recipe:
    """Parse ``text`` as the shipped scheme ``w4a16.yaml`` (messages name it by its bare file name)."""
    recipe_dir = tmp_path / "shipped"
    recipe_dir.mkdir(exist_ok=True)
    path = _write(recipe_dir, text, name="w4a16.yaml")
    monkeypatch.setattr(schema, "_SHIPPED_DIR", recipe_dir)
    return schema.parse_scheme(yaml.safe_load(path.read_text()), path, target)


def test_scheme_target_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x86, arm, cuda = (_parse_scheme(tmp_path, monkeypatch, SCHEME, target) for target in ("x86", "arm", "cuda"))
    assert (x86.name, x86.target, x86.description, x86.tune) == (
        "w4a16-x86",
        "x86",
        "test scheme for x86 CPUs",
        TuneOptions(trials=8),
    )
    assert (arm.name, arm.description, arm.tune) == ("w4a16-arm", "test scheme for arm", TuneOptions())
    assert (cuda.name, cuda.description) == ("w4a16-cuda", "test scheme for GPUs")
    assert x86.convert == arm.convert == cuda.convert
    assert x86.convert[0].key_path == "convert[0]"


SCHEME_BAD = {
    "name": (SCHEME.replace("name: w4a16", "name: other"), "x86", "name: 'other' must equal the file name 'w4a16'"),
    "missing targets": ("name: w4a16\nconvert: []\n", "x86", "targets: missing"),
    "top-level target": (SCHEME + "    target: x86\n", "x86", "target: unknown key"),
    "no part": (
        SCHEME.replace("      arm:\n", ""),
        "arm",
        "targets: no part for target 'arm'; this scheme has x86, cuda",
    ),
    "part key": (
        SCHEME.replace("{description: GPUs}", "{tuning: 1, description: GPUs}"),
        "cuda",
        "targets.cuda.tuning: unknown key; did you mean 'tune'?",
    ),
    "part not a mapping": (SCHEME.replace("{description: GPUs}", "[GPUs]"), "cuda", "targets.cuda: must be a mapping"),
    "cuda tune": (
        SCHEME.replace("{description: GPUs}", "{tune: {trials: 8}}"),
        "cuda",
        "targets.cuda.tune: CUDA kernels are not tuned",
    ),
    "tune key path": (SCHEME.replace("trials: 8", "trials: -1"), "x86", "targets.x86.tune.trials: must be an integer"),
    "part description": (SCHEME.replace("x86 CPUs", "[x86]"), "x86", "targets.x86.description: must be a string"),
    "unknown target": (SCHEME.replace("arm:", "amr:"), "amr", "targets: unknown target 'amr'"),
    "pass option": (SCHEME.replace("bits: 4", "bits: 5"), "arm", "convert[0].bits: recipe_test_pass: bits=5"),
}


@pytest.mark.parametrize("case", sorted(SCHEME_BAD))
def test_bad_scheme_names_file_and_key_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    text, target, expected = SCHEME_BAD[case]
    with pytest.raises(RecipeError) as info:
        _parse_scheme(tmp_path, monkeypatch, text, target)
    assert str(info.value).startswith("w4a16.yaml: ")
    assert expected in str(info.value)


def test_user_recipe_may_have_any_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: something-else\ntarget: x86\nconvert: []\n")
    assert recipes.load(path).name == "something-else"
