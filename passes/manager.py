"""The pass manager: named passes, a textual pipeline form that round-trips, and optional
verification (graph validity plus function preservation in float64) after each pass."""
from __future__ import annotations

import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable


from graphgrow import GraphgrowError, Network
from graphgrow.errors import did_you_mean

from .blocks import insert_block
from .extend import extend_all
from .insert import insert_identity
from .prune import prune
from .record import Record, function_change
from .widen import widen


@dataclass(frozen=True)
class PassInfo:
    name: str
    run: Callable[..., tuple[Network, Record]]
    preserves_function: bool = True


PASSES: dict[str, PassInfo] = {info.name: info for info in (
    PassInfo("insert-identity", insert_identity),
    PassInfo("widen", widen),
    PassInfo("extend-all", extend_all),
    PassInfo("prune", prune, preserves_function=False),  # exact only where what it removes is dead
    PassInfo("insert-block", insert_block),
)}


def register_pass(name: str, run: Callable[..., tuple[Network, Record]], preserves_function: bool = True) -> None:
    """Make a pass available to pipelines under a kebab-case name."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name):
        raise ValueError(f"pass names are kebab-case, got {name!r}")
    PASSES[name] = PassInfo(name, run, preserves_function)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ";".join(_format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse_value(text: str, declared: Any = None) -> Any:
    """The value of an option written as ``text``, of the type the pass declares for it
    (``declared``: the parameter's annotation; without one the form decides: a number, true/false,
    a name or a list). A node called ``inf`` or ``1e3`` stays a name where a name is declared."""
    text = text.strip()
    options = _declared_types(declared)
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        item = next((typing.get_args(t)[0] for t in options if typing.get_origin(t) is list
                     and typing.get_args(t)), None)
        return [_parse_value(part, item) for part in inner.split(";")] if inner else []
    for kind in options or (bool, int, float, str):
        value = _as_type(text, kind)
        if value is not None:
            return value
    expected = " or ".join(getattr(t, "__name__", str(t)) for t in options) or "a number, true/false or a name"
    raise GraphgrowError(f"pipeline option value {text!r} is not {expected}",
                         hint="numbers are finite; names are identifiers; lists are written [a;b;c]")


def _declared_types(declared: Any) -> tuple:
    """The concrete types an annotation allows (``int | None`` -> (int,)); () when unknown."""
    if declared in (None, inspect.Parameter.empty, Any):
        return ()
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        return tuple(t for t in typing.get_args(declared) if t is not type(None))
    return (declared,)


def _as_type(text: str, kind: Any) -> Any:
    """``text`` read as ``kind`` (bool, int, float, str), or None where it is not one."""
    if kind is bool:
        return {"true": True, "false": False}.get(text)
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            return None
        if kind is float and not math.isfinite(value):
            raise GraphgrowError(f"pipeline option value {text!r} is not a finite number")
        return value
    if kind is str:
        return text if _NAME.fullmatch(text) else None
    return None


def _option_types(run: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(run)
    except Exception:  # annotations that do not resolve: read values by their form
        return {}


@dataclass(frozen=True)
class Step:
    """One pass of a pipeline with its options."""
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options) + "}"


@dataclass(frozen=True)
class Pipeline:
    """A sequence of passes; ``str`` gives the textual form and ``parse`` reads it back."""
    steps: tuple[Step, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return ",".join(map(str, self.steps))

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        """Read ``name{key=value,...},name,...``; a GraphgrowError points at the column."""
        steps, position = [], 0
        pattern = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(\{([^{}]*)\})?\s*(,|$)")
        while position < len(text):
            match = pattern.match(text, position)
            if not match:
                raise GraphgrowError(f"cannot read pipeline at column {position + 1}: {text[position:][:30]!r}",
                                     column=position + 1,
                                     hint="write passes as name{key=value,...} separated by commas")
            name, body = match.group(1), match.group(3)
            if name not in PASSES:
                raise GraphgrowError(f"unknown pass '{name}'", column=position + 1,
                                     hint=did_you_mean(name, PASSES) or f"passes: {', '.join(PASSES)}")
            options, declared = [], _option_types(PASSES[name].run)
            for item in _split_options(body or ""):
                key, sep, value = item.partition("=")
                if not sep or not _NAME.fullmatch(key.strip()):
                    raise GraphgrowError(f"pass '{name}': option {item!r} is not key=value", column=position + 1)
                options.append((key.strip(), _parse_value(value, declared.get(key.strip()))))
            steps.append(Step(name, tuple(options)))
            position = match.end()
            if match.group(4) == "," and position == len(text):
                raise GraphgrowError("pipeline ends with a comma", column=position)
        return cls(tuple(steps))

    def run(self, network: Network, verify: bool = False, probe_batch: int = 8,
            seed: int = 0) -> tuple[Network, list[Record]]:
        """Apply the passes in order; with ``verify`` check each result (see ``verify_pass``)."""
        records = []
        for index, step in enumerate(self.steps):
            info = PASSES[step.name]
            before = [str(s) for s in self.steps[:index]]
            try:
                _check_options(info, step)
                new, record = info.run(network, **dict(step.options))
                if verify:
                    verify_pass(network, new, info.preserves_function, probe_batch, seed)
            except GraphgrowError as err:
                raise GraphgrowError(f"pass {step} failed: {err.message}", file=err.file, node=err.node,
                                     hint=f"passes before it: {', '.join(before) or 'none'}"
                                          + (f"; {err.hint}" if err.hint else "")) from None
            records.append(record)
            network = new
        return network, records


def _check_options(info: PassInfo, step: Step) -> None:
    parameters = inspect.signature(info.run).parameters
    known = [name for name in list(parameters)[1:]]
    for key, _ in step.options:
        if key not in known:
            raise GraphgrowError(f"pass '{step.name}' has no option '{key}'",
                                 hint=did_you_mean(key, known) or f"options: {', '.join(known)}")
    missing = [name for name in known if parameters[name].default is inspect.Parameter.empty
               and name not in dict(step.options)]
    if missing:
        raise GraphgrowError(f"pass '{step.name}' needs option(s) {', '.join(missing)}")


def _split_options(body: str) -> list[str]:
    items, depth, current = [], 0, ""
    for char in body:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        items.append(current)
    return [item.strip() for item in items]


def verify_pass(old: Network, new: Network, preserves_function: bool = True, probe_batch: int = 8,
                seed: int = 0, tolerance: float = 1e-10) -> float:
    """Check that ``new`` is a valid graph and, for function-preserving passes, that it equals
    ``old`` on a float64 probe batch (eval mode); returns the max abs difference."""
    new.graph.infer_shapes()
    if not preserves_function:
        return 0.0
    difference = function_change(old, new, probe_batch, seed)
    if not difference <= tolerance:
        first_new = next((n for n in new.graph.names() if n not in old.graph), None)
        raise GraphgrowError(f"the function changed: max abs difference {difference:.3g} > {tolerance:g} "
                             "on a float64 probe batch", file=new.graph.source, node=first_new)
    return difference
