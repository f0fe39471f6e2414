"""Name lookups with helpful errors, and validation of a component's parameters.

Every pluggable part of fedsim (dataset, partitioner, model, strategy, engine) is a plain
``dict`` from a name to a class or function, kept beside the code it names. This module is
the one place that turns a name from an experiment file into that object, and a table of
parameters into checked keyword arguments, with errors that name the bad key or value.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

import pydantic

from fedsim.errors import UserError


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def describe(obj: Any) -> str:
    """The first paragraph of an object's docstring, on one line: its description."""
    doc = (inspect.getdoc(obj) or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def lookup(table: Mapping[str, Any], name: str, kind: str) -> Any:
    """Return ``table[name]``, or raise a UserError that suggests the closest name.

    ``kind`` is also the experiment table the name comes from ("dataset", "model", ...).
    """
    if name in table:
        return table[name]
    raise UserError(
        f"[{kind}] name = {name!r} is not a known {kind}{did_you_mean(name, table)} "
        f"(choose from: {', '.join(sorted(table))})"
    )


def load_reference(reference: str, kind: str) -> Any:
    """Import ``"package.module:Name"`` (from the current folder or the Python path) and
    return ``Name``."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{kind} reference {reference!r} must look like 'package.module:Name'")
    if os.getcwd() not in sys.path:  # `fedsim run` finds a my_strategy.py beside the experiment
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"cannot import module {module_name!r} for {kind} {reference!r}: {error}") from None
    except SyntaxError as error:  # the user's own module: say where, in one line
        where = f"{error.filename}, line {error.lineno}" if error.filename else f"line {error.lineno}"
        raise UserError(
            f"cannot import module {module_name!r} for {kind} {reference!r}: "
            f"syntax error in {where}: {error.msg}; fix the module"
        ) from None
    except Exception as error:  # raised by the module's own code while it was imported
        raise UserError(
            f"cannot import module {module_name!r} for {kind} {reference!r}: importing it raised "
            f"{type(error).__name__}: {first_line(error)}{_where_raised(error, module_name)}; fix the module"
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        names = [n for n in vars(module) if not n.startswith("_")]
        raise UserError(
            f"module {module_name!r} has no {attribute!r}{did_you_mean(attribute, names)} for {kind} {reference!r}"
        ) from None


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (a message may span lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _where_raised(error: BaseException, module_name: str) -> str:
    """Where in the named module's file the error was raised, as " (my_module.py, line 3)"."""
    top = module_name.split(".")[-1]
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.basename(f.filename) == f"{top}.py"]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


class LazyRegistry(Mapping[str, Any]):
    """A name -> object table whose objects are imported on first use, from
    ``"package.module:Name"`` references, so that importing a registry is cheap."""

    def __init__(self, references: Mapping[str, str]) -> None:
        self._references = dict(references)
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            module, _, attribute = self._references[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def __iter__(self):
        return iter(self._references)

    def __len__(self) -> int:
        return len(self._references)


def plugin_table(group: str) -> dict[str, Any]:
    """Entry points of ``group`` as a lazy name -> loader table (loaded on lookup)."""
    return {ep.name: ep for ep in entry_points(group=group)}


def resolve_class(
    name: str, built_in: Mapping[str, type], plugin_group: str, base: type, what: str, where: str
) -> type:
    """The class ``name`` stands for: fedsim's own (``built_in``), an installed package's
    entry point in ``plugin_group``, or a ``"package.module:Class"`` reference; a
    UserError unless it is a subclass of ``base``. ``what`` names the kind ("strategy"),
    ``where`` the key the name came from ("[strategy] name", "method")."""
    if ":" in name:
        cls = load_reference(name, what)
    elif name in built_in:
        cls = built_in[name]
    else:
        plugins = plugin_table(plugin_group)
        if name not in plugins:
            known = sorted({*built_in, *plugins})
            choices = f"choose from: {', '.join(known)}, or give" if known else "give"
            raise UserError(
                f"{where} = {name!r} is not a known {what}{did_you_mean(name, known)} "
                f"({choices} 'package.module:ClassName')"
            )
        cls = plugins[name].load()
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise UserError(f"{where} = {name!r} is not a subclass of {_public_name(base)}")
    return cls


def _public_name(cls: type) -> str:
    """``package.Class`` by the shortest package that exports the class."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and getattr(module, cls.__name__, None) is cls:
            return f"{module.__name__}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _initialisers(component: Callable[..., Any]) -> list[Callable[..., Any]]:
    """The functions whose parameters a component accepts.

    For a class: its ``__init__``, and while that forwards ``**kwargs``, the ``__init__``
    of each base class too, so that a subclass written as
    ``def __init__(self, *, my_option=1, **kwargs): super().__init__(**kwargs)`` still
    accepts (and has validated) its parent's parameters.
    """
    if not inspect.isclass(component):
        return [component]
    chain = []
    for klass in component.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        chain.append(klass.__init__)
        parameters = inspect.signature(klass.__init__).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return chain


def accepted_parameters(component: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword parameters a class (its ``__init__`` chain) or function accepts."""
    accepted: dict[str, inspect.Parameter] = {}
    for function in _initialisers(component):
        for name, p in inspect.signature(function).parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                accepted.setdefault(name, p)
    return accepted


def _type_hints(component: Callable[..., Any]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for function in _initialisers(component):
        try:
            for name, hint in typing.get_type_hints(function, include_extras=True).items():
                hints.setdefault(name, hint)
        except Exception:  # unresolvable forward references: those values go unchecked
            continue
    return hints


def first_error_line(error: pydantic.ValidationError) -> tuple[tuple[Any, ...], Any, str]:
    """(location, input value, message) of a pydantic error's first entry."""
    first = error.errors()[0]
    message = first["msg"]
    if first.get("ctx", {}).get("error") is not None:
        message = str(first["ctx"]["error"])
    return tuple(first["loc"]), first.get("input"), message


def _refuse_another_components_key(key: str, where: str, name: str, registry: Mapping[str, Callable[..., Any]]) -> None:
    """A key that other components of the registry take most likely means the wrong name: say so."""
    # in the registry's order, which puts the recommended component first (ray before flower)
    owners = [other for other, component in registry.items() if key in accepted_parameters(component)]
    if owners:
        shown = ", ".join(map(repr, owners[:3])) + (", ..." if len(owners) > 3 else "")
        table = where.strip("[]")
        raise UserError(
            f"{where} {key!r} is not an option of {table} {name!r} but of {shown}; "
            f"set {where} name = {owners[0]!r} or remove {key}"
        )


def validate_parameters(
    component: Callable[..., Any],
    params: Mapping[str, Any],
    where: str,
    reserved: Iterable[str] = (),
    chosen: tuple[str, Mapping[str, Callable[..., Any]]] | None = None,
) -> dict[str, Any]:
    """Check ``params`` against ``component``'s signature and coerce them to its types.

    ``where`` prefixes every error (for example ``"[partition]"``). ``reserved`` names
    parameters that fedsim fills in itself and that the user may therefore omit.
    A component's ``required_help`` (a dict by key) says what a missing required key means.
    ``chosen`` is ``(name, registry)`` when the table's ``name`` key picked the component
    from a registry: ``name`` is then a valid key too, and an unknown key that only other
    components of the registry take (``alpha`` under ``iid``) is reported as the wrong
    ``name``. Unknown keys, missing required keys and values of the wrong type each raise
    a one-line UserError.
    """
    accepted = accepted_parameters(component)
    hints = _type_hints(component)
    reserved = set(reserved)
    table_keys = ["name"] if chosen else []
    for key in params:
        if key not in accepted:
            hint = did_you_mean(key, [*table_keys, *accepted])
            if not hint and chosen:
                _refuse_another_components_key(key, where, *chosen)
            if not hint:
                settable = [*table_keys, *(name for name in accepted if name not in reserved)]
                hint = f" (valid keys: {', '.join(settable)})" if settable else " (it takes no keys)"
            raise UserError(f"{where} unknown key {key!r}{hint}")
    missing = [
        name
        for name, p in accepted.items()
        if p.default is inspect.Parameter.empty and name not in params and name not in reserved
    ]
    if missing:
        # a component may say what a required key means (Krum's f), for the one-line error
        meaning = getattr(component, "required_help", {}).get(missing[0])
        raise UserError(f"{where} missing required key {missing[0]!r}" + (f" ({meaning})" if meaning else ""))
    checked = {}
    for key, value in params.items():
        hint = hints.get(key)
        if hint is None:
            checked[key] = value
            continue
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML spells it
        if isinstance(value, bool) and _is_number_type(hint):
            raise UserError(f"{where} {key} = {shown} is invalid: Input should be a number, not true or false")
        try:
            checked[key] = _adapter(hint).validate_python(value, strict=False)
        except pydantic.ValidationError as error:
            _, _, message = first_error_line(error)
            raise UserError(f"{where} {key} = {shown} is invalid: {message}") from None
        except pydantic.PydanticSchemaGenerationError:
            checked[key] = value
    return checked


# No parameter takes NaN or infinity unless its type says so (``Annotated[float,
# pydantic.AllowInfNan(True)]``): ``lr = inf`` trains to NaN, ``num_cpus = inf`` crashes Ray.
FINITE_FLOATS = pydantic.ConfigDict(allow_inf_nan=False)


def _adapter(hint: Any) -> pydantic.TypeAdapter:
    """A validator for ``hint`` that refuses NaN and infinity in every float it holds (a
    model, dataclass or TypedDict keeps its own config)."""
    try:
        return pydantic.TypeAdapter(hint, config=FINITE_FLOATS)
    except pydantic.PydanticUserError:
        return pydantic.TypeAdapter(hint)


def _is_number_type(hint: Any) -> bool:
    """Whether ``hint`` is int or float (through Annotated and Optional): a TOML boolean there
    is a mistake that pydantic's lax mode would read as 1 or 0."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _is_number_type(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return bool(options) and all(_is_number_type(arg) for arg in options)
    return hint in (int, float)


def build(component: Callable[..., Any], params: Mapping[str, Any], where: str, **fixed: Any) -> Any:
    """Validate ``params`` and call ``component(**fixed, **params)``.

    A ValueError from the component (its own range checks) becomes a UserError prefixed
    with ``where``, so that the message names the section as well as the parameter.
    """
    checked = validate_parameters(component, params, where, reserved=fixed)
    try:
        return component(**fixed, **checked)
    except pydantic.ValidationError as error:
        loc, value, message = first_error_line(error)
        key = loc[0] if loc else "?"
        raise UserError(f"{where} {key} = {value!r} is invalid: {message}") from None
    except ValueError as error:
        raise UserError(f"{where} {error}") from None
