"""Keyword dicts of configs (net_args, dit_args, objective_args): every value checked against its constructor's
annotation, the error naming the key path, the value and the type."""
from typing import Any, Literal

import pytest

from tcae_ldm.utils.kwargs import check_keywords, keyword_dict, matches, merged_types, parameter_types, type_name


def build(size: int, ratio: float = 4.0, norm: bool = True, stats: list[float] | None = None,
          kinds: str | tuple[str] = "a", shape: tuple[int, int] = (1, 2), mode: Literal["x", "y"] = "x", free=None):
    """A constructor with the kinds of annotations configs meet."""


def other(size: str, extra: int = 0):
    """Another constructor that types `size` differently."""


def test_values_are_checked_against_their_annotation():
    kind = keyword_dict("Args", parameter_types(build))
    check_keywords({"size": 3, "ratio": 2, "norm": False, "stats": None, "kinds": ["a", "b"], "shape": [3, 4],
                    "mode": "y", "free": object()}, kind, "model.args")  # every one fits (an int is a float)
    for key, value, expected in [
        ("size", "abc", "model.args.size: expected int, got 'abc' (str)"),
        ("size", True, "model.args.size: expected int, got True (bool)"),  # YAML's true is not a number
        ("ratio", "4x", "model.args.ratio: expected float, got '4x' (str)"),
        ("norm", 1, "model.args.norm: expected bool, got 1 (int)"),
        ("stats", [1.0, "a"], "model.args.stats: expected list[float] or None, got [1.0, 'a'] (list)"),
        ("kinds", [1], "model.args.kinds: expected str or tuple[str], got [1] (list)"),
        ("shape", [1, 2, 3], "model.args.shape: expected tuple[int, int], got [1, 2, 3] (list)"),
        ("mode", "z", "model.args.mode: expected 'x' or 'y', got 'z' (str)"),
    ]:
        with pytest.raises(TypeError) as err:
            check_keywords({key: value}, kind, "model.args")
        assert str(err.value) == expected


def test_types_of_several_constructors_are_merged():
    types = parameter_types(build, other)
    assert types["size"] == int | str and types["extra"] is int and types["free"] is Any
    assert merged_types({"a": int}, {"a": Any}) == {"a": Any}
    assert matches("3", types["size"]) and matches(3, types["size"]) and not matches(3.5, types["size"])
    assert type_name(types["size"]) == "int or str"


def test_the_parser_sees_only_the_keys():
    """jsonargparse would name only the dict, not the key inside it: values reach check_keywords untouched."""
    kind = keyword_dict("Args", parameter_types(build))
    assert kind.__annotations__ == {k: Any for k in sorted(parameter_types(build))}
    assert kind.__value_types__["size"] is int and keyword_dict("Free", {"a", "b"}).__value_types__ == {"a": Any,
                                                                                                     "b": Any}
