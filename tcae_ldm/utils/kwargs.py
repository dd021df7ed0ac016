"""Free-form keyword dicts of configs (`net_args`, `dit_args`) whose keys are checked when a config is parsed."""
from __future__ import annotations

import inspect
from typing import Any, TypedDict

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def parameter_names(*constructors) -> set[str]:
    """The named parameters of the callables (classes: of their constructors)."""
    return {n for fn in constructors for n, p in inspect.signature(fn).parameters.items() if p.kind in _NAMED}


def keyword_dict(name: str, keys) -> type:
    """A TypedDict of the given keys, each optional, any value.

    As a config annotation it makes jsonargparse refuse a misspelt key while it parses the config, naming the
    key, where a plain dict would carry the typo into a constructor or past it. Values are left to the
    constructor to check.
    """
    return TypedDict(name, {k: Any for k in sorted(keys)}, total=False)
