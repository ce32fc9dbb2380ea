"""Notebook parameters -> config dataclasses: strings as papermill's `-p` passes them are read
as YAML and checked against the field types, with a message naming the parameter and the `-y`
form; every notebook builds its config with one call, and its parameters' defaults are the
config's (the few that differ on purpose listed below, each with its reason)."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from kaggle_utils.cache.preprocess import PreprocessConfig
from kaggle_utils.common.config import config_from_parameters, parse_parameter, yaml_flow
from kaggle_utils.experiments.runner import ExperimentConfig
from kaggle_utils.finetune.train import FinetuneConfig
from kaggle_utils.pretrain.train import PretrainConfig
from kaggle_utils.segmentation.train import SegmentationConfig

ROOT = Path(__file__).resolve().parents[1]

# The notebooks that build a config dataclass from their parameters (04 calls
# `predict_test_set` with its parameters as arguments).
NOTEBOOK_CONFIGS: dict[str, type] = {
    "01_dicom_preprocess": PreprocessConfig,
    "02_voco2d_pretrain": PretrainConfig,
    "03_finetune_bilstm": FinetuneConfig,
    "05_experiments": ExperimentConfig,
    "06_organ_segmentation": SegmentationConfig,
}

# Parameters whose default differs from the config field's on purpose.
OUTPUT_FOLDER = "empty: the platform's output folder (Kaggle, Colab, local), resolved in the cell"
INTENDED_DIFFERENCES: dict[tuple[str, str], str] = {
    ("02_voco2d_pretrain", "output_dir"): OUTPUT_FOLDER,
    ("02_voco2d_pretrain", "momentum_end"): "0 reads as None (a constant momentum), in the cell",
    ("03_finetune_bilstm", "output_dir"): OUTPUT_FOLDER,
    ("05_experiments", "experiment_dir"): OUTPUT_FOLDER,
    ("06_organ_segmentation", "output_dir"): OUTPUT_FOLDER,
    ("06_organ_segmentation", "cache_dir"): OUTPUT_FOLDER,
}


def parameters_cell(notebook: str) -> dict[str, Any]:
    """The defaults of a notebook's parameters cell (`# %% tags=["parameters"]` up to the next
    `# %%`), read from its .py with `ast` and `ast.literal_eval`."""
    text = (ROOT / "notebooks" / f"{notebook}.py").read_text()
    start = text.index('# %% tags=["parameters"]\n')
    start = text.index("\n", start) + 1
    end = text.index("# %%", start)
    defaults = {}
    for node in ast.parse(text[start:end]).body:
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        elif isinstance(node, ast.Assign):
            targets = node.targets
        else:
            continue
        for target in targets:
            assert isinstance(target, ast.Name), ast.dump(target)
            defaults[target.id] = ast.literal_eval(node.value)
    assert defaults, f"no parameters in {notebook}"
    return defaults


def recipe_fields(config_class: type) -> set[str]:
    return config_class.recipe_fields() if hasattr(config_class, "recipe_fields") else set()


def field_defaults(config_class: type) -> dict[str, Any]:
    defaults = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def plain(value: Any) -> Any:
    """Tuples as lists, at every depth: a list parameter equals a tuple default by value."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------- parse_parameter


@pytest.mark.parametrize(
    ("text", "annotation", "expected"),
    [
        ("[32, 96, 96]", list[int], [32, 96, 96]),
        ("[32, 96, 96]", tuple[int, int, int], (32, 96, 96)),
        ("[[8, 32, 32], [16, 8, 8]]", tuple[tuple[int, int, int], ...], ((8, 32, 32), (16, 8, 8))),
        ("[liver, [50, 400]]", list[str | list[float]], ["liver", [50.0, 400.0]]),
        ("[0.5, 1]", list[float], [0.5, 1.0]),
        ("{pooling: [max, mean]}", dict[str, list[Any]], {"pooling": ["max", "mean"]}),
        ("3", int, 3),
        ("1e-4", float, 1e-4),
        ("0.25", float, 0.25),
        ("2", float, 2.0),
        ("true", bool, True),
        ("False", bool, False),
        ("None", float | None, None),
        ("null", float | None, None),
        ("0.99", float | None, 0.99),
        ("[a, b]", str | list[str], ["a", "b"]),
        ("outputs/cache", str | list[str], "outputs/cache"),  # a string field keeps its string
        ("voco2d-cache-*/cache", str | list[str], "voco2d-cache-*/cache"),
        ("[1, 2]", str, "[1, 2]"),
    ],
)  # fmt: skip
def test_strings_are_read_as_yaml_where_the_field_takes_no_string(
    text: str, annotation: Any, expected: Any
) -> None:
    parsed = parse_parameter("p", text, annotation)
    assert parsed == expected and type(parsed) is type(expected)


def test_values_are_checked_and_converted_where_nothing_is_lost() -> None:
    assert parse_parameter("shape", [1, 2, 3], tuple[int, int, int]) == (1, 2, 3)
    assert type(parse_parameter("lr", 1, float)) is float
    assert parse_parameter("windows", ((50, 400),), list[list[float]]) == [[50.0, 400.0]]
    for name, value, annotation in [
        ("epochs", 2.5, int),  # a float where an int is asked: not rounded
        ("epochs", True, int),
        ("resume", 1, bool),
        ("shape", [1, 2], tuple[int, int, int]),
        ("seeds", [0, "1"], list[int]),
        ("backbone", ["a"], str),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=f"parameter '{name}' is "):
            parse_parameter(name, value, annotation)


@pytest.mark.parametrize(
    ("name", "text", "annotation", "suggested"),
    [
        # papermill -p shape [32, 96 (cut by the shell): not YAML; the suggestion is the example
        ("shape", "[32, 96", list[int], "-y 'shape: [96, 256, 256]'"),
        # -p windows soft_tissue: a name where a list of them is asked
        ("windows", "soft_tissue", list[str | list[float]], "-y 'windows: [soft_tissue]'"),
        ("shape", "32, 96, 96", list[int], "-y 'shape: [32, 96, 96]'"),
        ("lr", "fast", float, "-y 'lr: 0.5'"),
        ("resume", "maybe", bool, "-y 'resume: true'"),
        ("grid", "{pooling: [max", dict[str, list[Any]], "-y 'grid: {name: [value, value]}'"),
    ],
)  # fmt: skip
def test_a_bad_string_names_the_parameter_and_the_y_form(
    name: str, text: str, annotation: Any, suggested: str
) -> None:
    example = [96, 256, 256] if name == "shape" and text.startswith("[") else None
    kwargs = {"example": example} if example else {}
    with pytest.raises(ValueError) as raised:
        parse_parameter(name, text, annotation, **kwargs)
    message = str(raised.value)
    assert f"parameter '{name}' arrived as the string {json.dumps(text)}" in message
    assert "papermill <notebook> <output> " + suggested in message, message


def test_the_errors_papermill_p_used_to_give_now_come_from_the_parser() -> None:
    """`-p shapes [[8, 32, 32]]` gave "invalid literal for int() with base 10: '['" deep in
    PreprocessConfig.from_params, `-p windows soft_tissue` "unknown window 's'" in
    parse_windows: notebook 01 now parses both first."""
    config = config_from_parameters(PreprocessConfig, {"shapes": "[[8, 32, 32]]"})
    assert config.shapes == ((8, 32, 32),)
    with pytest.raises(ValueError, match="parameter 'shapes' arrived as the string"):
        config_from_parameters(PreprocessConfig, {"shapes": "[[8, 32, 32]"})
    source = (ROOT / "notebooks" / "01_dicom_preprocess.py").read_text()
    assert 'parse_windows(parse_parameter("windows", windows, list[str | list[float]]))' in source
    with pytest.raises(ValueError, match="-y 'windows: \\[soft_tissue\\]'"):
        parse_parameter("windows", "soft_tissue", list[str | list[float]])


def test_yaml_flow_reads_back_as_the_value() -> None:
    import yaml

    for value in (
        [96, 256, 256], [[50, 400]], ["liver", "bone"], {"pooling": ["max", "mean"]}, 1e-4,
        True, None, "a b", "x: y", "", "[1]", "True", "/kaggle/input/a-b/cache", ["1", "null"],
    ):  # fmt: skip
        assert yaml.safe_load(yaml_flow(value)) == value, (value, yaml_flow(value))


# -------------------------------------------------------------------- config_from_parameters


def test_a_config_takes_the_parameters_named_as_its_fields_and_the_overrides() -> None:
    namespace = {
        "shape": "[32, 96, 96]", "lr": "1e-3", "folds_to_run": "[0]", "resume": "false",
        "epochs": 3, "output_dir": "", "json": json, "unrelated": object(),
    }  # fmt: skip
    config = config_from_parameters(FinetuneConfig, namespace, output_dir="runs/a", epochs=5)
    assert config.shape == [32, 96, 96] and config.lr == 1e-3 and config.folds_to_run == [0]
    assert config.resume is False
    assert config.output_dir == "runs/a" and config.epochs == 5  # overrides win
    assert config.hidden_size == FinetuneConfig().hidden_size  # not a parameter: the default
    with pytest.raises(TypeError, match="no field not_a_field"):
        config_from_parameters(FinetuneConfig, {}, not_a_field=1)
    with pytest.raises(ValueError, match="parameter 'epochs' arrived as the string \"many\""):
        config_from_parameters(FinetuneConfig, {"epochs": "many"})
    with pytest.raises(ValueError, match=r"parameter 'epochs' is \['many'\], not int"):
        config_from_parameters(FinetuneConfig, {"epochs": ["many"]})


def test_a_wrong_string_in_a_config_suggests_the_fields_default() -> None:
    with pytest.raises(ValueError, match=r"-y 'shape: \[96, 256, 256\]'") as raised:
        config_from_parameters(FinetuneConfig, {"shape": "[32, 96"})
    assert "parameter 'shape' arrived as the string \"[32, 96\"" in str(raised.value)


# ------------------------------------------------------------------------------ the notebooks


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


@pytest.mark.parametrize("notebook", NOTEBOOK_CONFIGS)
def test_notebook_builds_its_config_with_one_call(notebook: str) -> None:
    """One `config_from_parameters(<Config>, globals(), ...)`, no field-by-field copy."""
    name = NOTEBOOK_CONFIGS[notebook].__name__
    tree = ast.parse((ROOT / "notebooks" / f"{notebook}.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    built = [c for c in calls if _called_name(c) == "config_from_parameters"]
    assert len(built) == 1, f"{notebook}: {len(built)} calls of config_from_parameters"
    config_arg, namespace_arg = built[0].args[:2]
    assert name in ast.unparse(config_arg).split("."), ast.unparse(config_arg)
    assert ast.unparse(namespace_arg) == "globals()"
    copies = [ast.unparse(c)[:80] for c in calls if _called_name(c) in (name, "from_params")]
    assert not copies, f"{notebook} still builds {name} itself: {copies}"


@pytest.mark.parametrize("notebook", NOTEBOOK_CONFIGS)
def test_notebook_parameter_defaults_are_the_config_defaults(notebook: str) -> None:
    config_class = NOTEBOOK_CONFIGS[notebook]
    parameters, fields = parameters_cell(notebook), field_defaults(config_class)
    shared = sorted(set(parameters) & set(fields))
    assert shared, f"{notebook} names none of {config_class.__name__}'s fields"
    from_recipe = recipe_fields(config_class)
    differ = {
        name: (parameters[name], fields[name])
        for name in shared
        if plain(parameters[name]) != plain(fields[name])
        and (notebook, name) not in INTENDED_DIFFERENCES
        and not (name in from_recipe and parameters[name] is None)
    }
    assert not differ, f"{notebook}: parameter default != {config_class.__name__} default: {differ}"
    stale = {
        name for (nb, name) in INTENDED_DIFFERENCES if nb == notebook
        if name not in shared or plain(parameters[name]) == plain(fields[name])
    }  # fmt: skip
    assert not stale, f"listed as differing but equal (or gone): {stale}"


@pytest.mark.parametrize("notebook", NOTEBOOK_CONFIGS)
def test_notebook_defaults_and_their_p_strings_parse_as_the_fields(notebook: str) -> None:
    """Every default fits its field's type, and so does the same value passed as the string
    `-p` would give (papermill quotes a list: "[96, 256, 256]")."""
    import typing

    config_class = NOTEBOOK_CONFIGS[notebook]
    hints = typing.get_type_hints(config_class)
    parameters = parameters_cell(notebook)
    for name in sorted(set(parameters) & set(hints)):
        value = parameters[name]
        if value is None and name in recipe_fields(config_class):
            continue  # the recipe's value: tested below
        parsed = parse_parameter(name, value, hints[name])
        assert plain(parsed) == plain(value), name
        if isinstance(value, (list, dict)):
            assert plain(parse_parameter(name, yaml_flow(value), hints[name])) == plain(value)


# ------------------------------------------------------------------------------ the recipes

RECIPE_NOTEBOOKS = {"02_voco2d_pretrain": PretrainConfig, "03_finetune_bilstm": FinetuneConfig}


@pytest.mark.parametrize("notebook", RECIPE_NOTEBOOKS)
def test_the_notebook_leaves_exactly_the_recipe_fields_to_the_recipe(notebook: str) -> None:
    """A parameter is None in the notebook if and only if a recipe sets its field to a value
    other than the default: otherwise `recipe` could not set it (an explicit value wins)."""
    config_class = RECIPE_NOTEBOOKS[notebook]
    parameters = parameters_cell(notebook)
    left_to_recipe = {name for name, value in parameters.items() if value is None}
    assert parameters["recipe"] == "project"
    assert left_to_recipe == config_class.recipe_fields() - {"recipe"}, notebook


@pytest.mark.parametrize("config_class", [PretrainConfig, FinetuneConfig])
def test_a_recipe_sets_its_fields_and_explicit_values_win(config_class: type) -> None:
    official = config_class.recipe_values("official")
    assert official and config_class.recipe_values("project") == {}
    config = config_class.from_recipe("official")
    assert config.recipe == "official"
    for name, value in official.items():
        assert plain(getattr(config, name)) == plain(value), name
    # through a notebook's parameters: None takes the recipe's value, a value wins
    parameters = dict.fromkeys(config_class.recipe_fields()) | {"recipe": "official"}
    name = sorted(config_class.recipe_fields())[0]
    parameters[name] = getattr(config_class(), name)  # the project's value, given explicitly
    built = config_from_parameters(config_class, parameters)
    assert plain(getattr(built, name)) == plain(getattr(config_class(), name))
    for other in config_class.recipe_fields() - {name}:
        assert plain(getattr(built, other)) == plain(official[other]), other
    project = config_from_parameters(config_class, dict.fromkeys(config_class.recipe_fields()))
    assert plain(dataclasses.asdict(project)) == plain(dataclasses.asdict(config_class()))
    with pytest.raises(ValueError, match="recipe"):
        config_class.from_recipe("paper")


def test_the_official_recipes_are_the_authors_settings() -> None:
    """The values the issue's reading of the official code names (docs/method.md cites each
    line): a guard against a recipe drifting silently."""
    pre = PretrainConfig.from_recipe("official")
    assert (pre.feature_dropout, pre.feature_dropout_at) == (0.2, "slice")
    assert (pre.teacher_head, pre.projector_norm, pre.init) == ("trained", "crops", "imagenet")
    assert pre.amsgrad and pre.decay_norm_and_bias
    fine = FinetuneConfig.from_recipe("official")
    assert (fine.n_slices, fine.image_size, fine.backbone) == (48, 192, "efficientnetv2_rw_s")
    assert (fine.hidden_size, fine.num_layers, fine.dropout, fine.pooling) == (128, 1, 0.0, "max")
    assert fine.any_injury_weight == 0 and fine.slice_loss_weight == 0
    assert "extravasation" not in fine.targets
    assert (fine.hflip_prob, fine.vflip_prob, fine.zflip_prob) == (0.5, 0.5, 0.5)
    assert (fine.lr, fine.weight_decay, fine.lr_cycle_steps, fine.epochs) == (
        1.25e-4,
        1e-5,
        5000,
        20,
    )
