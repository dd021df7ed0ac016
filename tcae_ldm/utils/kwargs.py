"""Free-form keyword dicts of configs (`net_args`, `dit_args`, `objective_args`) whose keys and value types are
checked when a config is parsed."""
from __future__ import annotations

import inspect
import types
import typing
from typing import Any, TypedDict, Union

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def parameter_names(*constructors) -> set[str]:
    """The named parameters of the callables (classes: of their constructors)."""
    return {n for fn in constructors for n, p in inspect.signature(fn).parameters.items() if p.kind in _NAMED}


def _hints(fn) -> dict:
    fn = getattr(fn, "__init__", fn) if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve here: its values stay unchecked
        return {}


def parameter_types(*constructors) -> dict[str, Any]:
    """name -> annotated type of the named parameters of the callables (Any where one is not annotated)."""
    out = []
    for fn in constructors:
        hints = _hints(fn)
        out.append({n: hints.get(n, Any) for n, p in inspect.signature(fn).parameters.items()
                    if p.kind in _NAMED and n != "self"})
    return merged_types(*out)


def merged_types(*mappings: dict) -> dict[str, Any]:
    """The union of name -> type mappings; a name typed differently by several is typed by the union (Any wins)."""
    seen: dict[str, list] = {}
    for mapping in mappings:
        for name, tp in mapping.items():
            seen.setdefault(name, []).append(tp)
    out = {}
    for name, hints in seen.items():
        unique = list(dict.fromkeys(hints))
        out[name] = Any if Any in unique else unique[0] if len(unique) == 1 else Union[tuple(unique)]
    return out


def keyword_dict(name: str, keys) -> type:
    """A TypedDict of the given keys (a set: any value; a mapping: name -> type of its value), each optional.

    As a config annotation it makes jsonargparse refuse a misspelt key while it parses the config, naming the
    key, where a plain dict would carry the typo into a constructor or past it. Its values are typed Any for the
    parser (whose report would not name the key inside the dict); the types are kept in `__value_types__` for
    check_keywords, which the constructor taking the dict calls.
    """
    types = dict(keys) if isinstance(keys, dict) else {k: Any for k in keys}
    kind = TypedDict(name, {k: Any for k in sorted(types)}, total=False)
    kind.__value_types__ = types
    return kind


def type_name(tp) -> str:
    """int, float or None, list[float], ...: a type as a config's reader would write it."""
    if tp is type(None) or tp is None:
        return "None"
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_args(tp):
        args = ", ".join("..." if a is Ellipsis else type_name(a) for a in typing.get_args(tp))
        return f"{typing.get_origin(tp).__name__}[{args}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def matches(value, tp) -> bool:
    """Whether a config value (YAML's int, float, bool, str, list, dict, None) fits the annotation `tp`; an
    annotation of another kind is not checked here."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            return False
        # tuple[str] reads as "a tuple of str" in many signatures (diffusers'), so one type is any length
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return not args or all(matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type) and tp in (str, list, tuple):
        return isinstance(value, tp)
    return True


def check_keywords(values: dict | None, kind: type, where: str) -> None:
    """TypeError naming `where`.key, the value and the expected type for the first value of `values` that does not
    fit its type in the keyword_dict `kind`."""
    expected = getattr(kind, "__value_types__", {})
    for key, value in (values or {}).items():
        tp = expected.get(key, Any)
        if not matches(value, tp):
            raise TypeError(f"{where}.{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")
