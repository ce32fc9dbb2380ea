"""Run settings: the dataclasses every stage is configured with, written to and read from
config.json, and built from a notebook's parameters.

A notebook names its parameters as the fields of its config dataclass, and builds the config
with one call, `config_from_parameters(Config, globals(), **values_it_computed)`. papermill's
`-p name value` passes a list as the string "[32, 96, 96]"; `parse_parameter` reads such a
string as YAML and checks the result against the field's annotation, so that a wrong value
fails there, naming the parameter, instead of deep inside a stage.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any, ClassVar, TypeVar

from kaggle_utils.common.io import write_text_atomic

_Config = TypeVar("_Config", bound="JsonConfig")
_Dataclass = TypeVar("_Dataclass")


class JsonConfig:
    """Mixin for run-setting dataclasses: written to and read from a config.json (what
    `torchrun -m ... --config` reads).

    A config with a `recipe` field names its recipes in `RECIPES`: {name: {field: value}},
    the values a recipe gives the fields it sets, over the field defaults (the "project"
    recipe is the defaults themselves). `from_recipe` and `config_from_parameters` apply them.
    """

    RECIPES: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    @classmethod
    def recipe_values(cls, recipe: str) -> dict[str, Any]:
        """The field values `recipe` sets (the others keep their defaults).

        Raises:
            ValueError: an unknown recipe.
        """
        if recipe not in cls.RECIPES:
            raise ValueError(f"recipe must be one of {tuple(cls.RECIPES)}, not {recipe!r}")
        return copy.deepcopy(dict(cls.RECIPES[recipe]))

    @classmethod
    def recipe_fields(cls) -> set[str]:
        """The fields some recipe sets to a value other than its default: what a notebook
        leaves as None to take the recipe's."""
        defaults = {
            f.name: _field_default(f)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        }
        return {
            name
            for values in cls.RECIPES.values()
            for name, value in values.items()
            if value != defaults[name]
        }

    @classmethod
    def from_recipe(cls: type[_Config], recipe: str, /, **values: Any) -> _Config:
        """The config of `recipe`, with `values` over it."""
        return cls(**(cls.recipe_values(recipe) | {"recipe": recipe} | values))

    @classmethod
    def from_json(cls: type[_Config], path: str | Path) -> _Config:
        return cls(**json.loads(Path(path).read_text()))

    def to_json(self, path: str | Path) -> None:
        payload = dataclasses.asdict(self)  # type: ignore[call-overload]
        write_text_atomic(Path(path), json.dumps(payload, indent=1))


def config_from_parameters(
    config_class: type[_Dataclass], parameters: Mapping[str, Any], /, **overrides: Any
) -> _Dataclass:
    """`config_class` built from a notebook's namespace (`globals()`): every field whose name
    is in `parameters` takes that value, parsed and checked by `parse_parameter` against the
    field's annotation; `overrides` give the values the notebook computed (resolved paths,
    conversions such as `momentum_end=momentum_end or None`) and are passed on as they are;
    the other fields keep their defaults. A config with recipes (`JsonConfig.RECIPES`) starts
    from the recipe that `parameters["recipe"]` names; a parameter left as None takes the
    recipe's value (or the default) where the field is one a recipe sets.

    Raises:
        TypeError: `config_class` is not a dataclass, or an override names no field of it.
        ValueError: a parameter does not parse, or has the wrong type (`parse_parameter`).
    """
    if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
        raise TypeError(f"{config_class!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"{config_class.__name__} has no field {', '.join(unknown)}")
    hints = typing.get_type_hints(config_class)
    values: dict[str, Any] = {}
    recipe_fields: set[str] = set()
    if "recipe" in fields and issubclass(config_class, JsonConfig):
        recipe = overrides.get("recipe", parameters.get("recipe", _field_default(fields["recipe"])))
        values = config_class.recipe_values(str(recipe)) | {"recipe": recipe}
        recipe_fields = config_class.recipe_fields()
    for name, field in fields.items():
        if name in overrides:
            values[name] = overrides[name]
        elif name in parameters and not (parameters[name] is None and name in recipe_fields):
            values[name] = parse_parameter(
                name, parameters[name], hints[name], example=_field_default(field)
            )
    return config_class(**values)


_NO_EXAMPLE = object()


def parse_parameter(name: str, value: Any, annotation: Any, example: Any = _NO_EXAMPLE) -> Any:
    """A notebook parameter as `annotation` wants it.

    A string given where the annotation takes no string (a list, a number, a bool, None) is
    read as YAML, as papermill's `-y` would have: "[32, 96, 96]" -> [32, 96, 96], "1e-4" ->
    0.0001, "true" -> True, "null" or "None" -> None. Where the annotation takes a string or
    a list (`str | list[str]`), a string starting with "[" or "{" is read as YAML too. The
    value is then checked against the annotation (lists, tuples, dicts element by element;
    `typing.get_type_hints` resolves a dataclass's string annotations) and converted where it
    loses nothing: a list to a tuple field, an int to a float field. `example` (default: one
    made from the annotation) is what the error message suggests passing with `-y`.

    Raises:
        ValueError: naming the parameter: a string that does not parse, or a value of another
            type; for a string, with the `papermill ... -y 'name: value'` form to use.
    """
    if isinstance(value, str) and _read_as_yaml(value, annotation):
        parsed = _load_string(name, value, annotation, example)
        try:
            return _coerce(parsed, annotation)
        except _Mismatch as mismatch:
            example = _bracketed(value, annotation, example)
            raise ValueError(
                f"parameter {name!r} arrived as the string {_quoted(value)}, which is not "
                f"{_type_name(annotation)} ({mismatch}); {_use_yaml(name, annotation, example)}"
            ) from None
    try:
        return _coerce(value, annotation)
    except _Mismatch as mismatch:
        raise ValueError(
            f"parameter {name!r} is {value!r}, not {_type_name(annotation)} ({mismatch})"
        ) from None


class _Mismatch(Exception):
    """A value that does not fit an annotation; the message says which part."""


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _NO_EXAMPLE


def _arms(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _base(annotation: Any) -> Any:
    return typing.get_origin(annotation) or annotation


_TEXT = (str, Any, object)
_COLLECTIONS = (
    list, tuple, dict, collections.abc.Sequence, collections.abc.MutableSequence,
    collections.abc.Mapping, collections.abc.MutableMapping,
)  # fmt: skip


def _takes_text(arm: Any) -> bool:
    base = _base(arm)
    return arm in _TEXT or (isinstance(base, type) and issubclass(base, PurePath))


def _read_as_yaml(text: str, annotation: Any) -> bool:
    """Whether a string given for `annotation` is YAML to parse rather than the value."""
    arms = _arms(annotation)
    if not any(_takes_text(arm) for arm in arms):
        return True
    takes_collection = any(_base(arm) in _COLLECTIONS for arm in arms)
    return takes_collection and text.lstrip().startswith(("[", "{"))


def _load_string(name: str, text: str, annotation: Any, example: Any) -> Any:
    import yaml  # PyYAML: papermill's own dependency, preinstalled on Kaggle and Colab

    arms = _arms(annotation)
    if type(None) in arms and text.strip() in ("None", "none"):
        return None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(
            f"parameter {name!r} arrived as the string {_quoted(text)}, which is not valid YAML "
            f"({problem}); {_use_yaml(name, annotation, example)}"
        ) from None
    if isinstance(parsed, str) and float in arms:  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(parsed)
        except ValueError:
            pass
    return parsed


def _bracketed(text: str, annotation: Any, example: Any) -> Any:
    """`[text]` where that fits `annotation` (`-p windows liver` meant `[liver]`), else
    `example`."""
    import yaml

    try:
        items = yaml.safe_load(f"[{text}]")
        _coerce(items, annotation)
    except (yaml.YAMLError, _Mismatch):
        return example
    return items


def _coerce(value: Any, annotation: Any) -> Any:
    """`value` checked against `annotation`, converted where nothing is lost."""
    if annotation in (Any, object):
        return value
    if annotation in (None, type(None)):
        if value is None:
            return None
        raise _Mismatch(f"{value!r} is not None")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        problems = []
        for arm in args:
            try:
                return _coerce(value, arm)
            except _Mismatch as mismatch:
                problems.append(str(mismatch))
        raise _Mismatch("; ".join(dict.fromkeys(problems)))
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch(f"{value!r} is not one of {list(args)}")
    base = origin or annotation
    if base is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(f"{value!r} is not true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(f"{value!r} is not an integer")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch(f"{value!r} is not a number")
    if base is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(f"{value!r} is not a string")
    if isinstance(base, type) and issubclass(base, PurePath):
        if isinstance(value, (str, PurePath)):
            return value
        raise _Mismatch(f"{value!r} is not a path")
    if base in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"{value!r} is not a list")
        if base is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(f"{list(value)!r} does not have {len(args)} items")
            return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
        items = [_coerce(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if base is tuple else items
    if base in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        if not isinstance(value, Mapping):
            raise _Mismatch(f"{value!r} is not a mapping")
        key_type, value_type = args if len(args) == 2 else (Any, Any)
        return {_coerce(k, key_type): _coerce(v, value_type) for k, v in value.items()}
    if isinstance(base, type):
        if isinstance(value, base):
            return value
        raise _Mismatch(f"{value!r} is not {base.__name__}")
    return value  # an annotation this reader does not know (a TypeVar, ...): taken as it is


def _type_name(annotation: Any) -> str:
    if annotation in (None, type(None)):
        return "None"
    if annotation is Ellipsis:
        return "..."
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arm) for arm in args)
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _example(annotation: Any) -> Any:
    """A value of `annotation` to show in a message, where the field has no default."""
    arms = [a for a in _arms(annotation) if a not in (None, type(None))]
    arm = next((a for a in arms if not _takes_text(a)), arms[0] if arms else None)
    base, args = _base(arm), typing.get_args(arm)
    if base is bool:
        return True
    if base is int:
        return 1
    if base is float:
        return 0.5
    if base in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence):
        if base is tuple and args and args[-1] is not Ellipsis:
            return [_example(a) for a in args]
        return [_example(args[0]) if args else "item"] * 2
    if base in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return {"name": _example(args[1]) if len(args) == 2 else "value"}
    return "value"


def yaml_flow(value: Any) -> str:
    """`value` as one line of YAML (flow style), as papermill's `-y` takes it; strings
    unquoted where YAML reads them back unchanged."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str):
        import yaml

        special = any(c in value for c in ",[]{}:#&*!|>'\"%@`") or value != value.strip()
        plain = value and not special and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{yaml_flow(k)}: {yaml_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_flow(v) for v in value) + "]"
    return json.dumps(value)


def _use_yaml(name: str, annotation: Any, example: Any) -> str:
    shown = _example(annotation) if example is _NO_EXAMPLE else example
    kind = (
        "mappings" if isinstance(shown, Mapping)
        else "lists" if isinstance(shown, (list, tuple))
        else "such values"
    )  # fmt: skip
    command = f"papermill <notebook> <output> -y '{name}: {yaml_flow(shown)}'"
    return f"pass {kind} with -y: {command}"


def _quoted(text: str) -> str:
    return json.dumps(text if len(text) <= 60 else text[:57] + "...")
