"""A component's parameter defaults, as an experiment file can hold them."""

from __future__ import annotations

import inspect
from typing import Any

from fedsim.registry import accepted_parameters


def parameter_defaults(component: Any) -> dict[str, Any]:
    """The parameter defaults that a TOML file can hold (no None, no callables)."""

    def representable(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(representable(v) for v in value)
        return isinstance(value, (bool, int, float, str))

    return {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in accepted_parameters(component).items()
        if p.default is not inspect.Parameter.empty and representable(p.default)
    }
