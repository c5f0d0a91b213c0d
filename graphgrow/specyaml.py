"""Safe YAML with source locations: the reader under the spec format.

Every mapping and list remembers where it and its items stood (file, line, column), so that
errors point into the user's file. Duplicate keys and every non-standard tag are errors, and
the size a document stands for with aliases expanded is bounded (an "alias bomb" is refused).
"""
from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import GraphgrowError

# YAML aliases share one value among many places and repeat blocks copy their layers, so a
# small file can stand for a huge one (an "alias bomb"); this bounds the values (scalars,
# lists, mappings) the spec stands for, counted with every alias and repeat expanded
MAX_VALUES = 2_000_000
# YAML forbids '{' and '}' in plain scalars inside flow mappings, yet `{out: ${width}}` is the
# natural way to write a layer. Before parsing, the braces of each template are swapped for two
# private-use characters (same length, so reported columns stay right) that TEMPLATE matches.
TEMPLATE_OPEN, TEMPLATE_CLOSE = "\ue000", "\ue001"
_SOURCE_TEMPLATE = re.compile(r"\$\{([^{}\n]*)\}")
TEMPLATE = re.compile(r"\$" + TEMPLATE_OPEN + "([^" + TEMPLATE_CLOSE + "]*)" + TEMPLATE_CLOSE)


@dataclass(frozen=True)
class Loc:
    """Where something stands in a spec file (1-based line and column)."""
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def error(self, message: str, *, node: str | None = None, hint: str | None = None) -> GraphgrowError:
        return GraphgrowError(message, file=self.file, line=self.line, column=self.column,
                              node=node, hint=hint)


class LocMap(dict):
    """A mapping read from YAML that remembers where it and each of its values stood."""
    loc: Loc
    value_locs: dict


class LocList(list):
    loc: Loc
    item_locs: list


class _SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """SafeLoader that records locations and rejects duplicate keys and foreign tags."""

    def construct_object(self, node, deep=False):
        # an explicit standard tag on the wrong value (`!!float abc`, `!!bool x`, `!!seq a`)
        # makes PyYAML's constructors raise plain Python errors; report them where they stand
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise _loc(self, node.start_mark).error(
                f"cannot read this value as {node.tag.rsplit(':', 1)[-1]}: {str(err)[:80]}",
                hint="remove the explicit tag (!!...)") from None



def _loc(loader, mark) -> Loc:
    return Loc(loader.spec_file, mark.line + 1, mark.column + 1)


def _construct_mapping(loader, node):
    mapping = LocMap()
    mapping.loc = _loc(loader, node.start_mark)
    mapping.value_locs = {}
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise _loc(loader, key_node.start_mark).error(f"keys must be strings, got {key!r}")
        if key in mapping:
            raise _loc(loader, key_node.start_mark).error(f"duplicate key '{key}'")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.value_locs[key] = _loc(loader, value_node.start_mark)
    return mapping


def _construct_sequence(loader, node):
    items = LocList(loader.construct_object(child, deep=True) for child in node.value)
    items.loc = _loc(loader, node.start_mark)
    items.item_locs = [_loc(loader, child.start_mark) for child in node.value]
    return items


def _reject_tag(loader, tag_suffix, node):
    raise _loc(loader, node.start_mark).error(
        f"YAML tag '{node.tag}' is not allowed", hint="specs are data only; remove the tag")


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_SpecLoader.add_multi_constructor("", _reject_tag)
# The safe loader accepts a few more tags (!!set, !!omap, !!binary, !!timestamp); specs need none.
for _tag in ("set", "omap", "pairs", "binary", "timestamp"):
    _SpecLoader.add_constructor(f"tag:yaml.org,2002:{_tag}",
                                lambda loader, node: _reject_tag(loader, None, node))


def _construct_int(loader, node):
    try:
        return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)
    except ValueError as err:  # e.g. more digits than Python converts (sys.get_int_max_str_digits)
        raise _loc(loader, node.start_mark).error(f"bad integer: {str(err)[:80]}") from None


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
# YAML 1.1 reads `1e-5` (no dot) as a string; specs write eps and learning rates that way, so
# exponent floats without a dot are floats here, as in YAML 1.2.
_SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str, file: str | None = None) -> Any:
    """Safe-load YAML text into LocMap/LocList trees; syntax errors become GraphgrowError."""
    loader = None
    # Building the tree allocates many small acyclic objects; cyclic GC passes over the growing
    # tree made reading super-linear in spec size (2x per layer at 1000 layers), so pause it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        # the reader checks the characters already in the constructor (ReaderError)
        loader = _SpecLoader(_SOURCE_TEMPLATE.sub(lambda m: f"${TEMPLATE_OPEN}{m.group(1)}{TEMPLATE_CLOSE}", text))
        loader.spec_file = file
        document = loader.get_single_data()
        checkexpanded_size(document, Loc(file, 1, 1))
        return document
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        loc = Loc(file, mark.line + 1, mark.column + 1) if mark else Loc(file)
        raise loc.error(f"YAML syntax: {err.problem or err.context}") from None
    except yaml.reader.ReaderError as err:
        before = text[:err.position]
        loc = Loc(file, before.count("\n") + 1, err.position - (before.rfind("\n") + 1) + 1)
        raise loc.error(f"YAML syntax: special character U+{err.character:04X} is not allowed") from None
    except yaml.YAMLError as err:
        raise Loc(file).error(f"YAML syntax: {err}") from None
    except RecursionError:
        raise Loc(file).error("YAML nesting too deep") from None
    finally:
        if collecting:
            gc.enable()
        if loader is not None:
            loader.dispose()


def expanded_size(value: Any, sizes: dict[int, int]) -> int:
    """Values ``value`` stands for with aliases expanded; ``sizes`` memoises shared values, so
    this takes time linear in the YAML text, not in the expansion."""
    key = id(value)
    if key not in sizes:
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        sizes[key] = 1 + sum(expanded_size(child, sizes) for child in children)
    return sizes[key]


def checkexpanded_size(value: Any, loc: Loc, budget: int = MAX_VALUES, sizes: dict | None = None) -> int:
    """The expanded size of ``value``; an error at the innermost value that alone exceeds
    ``budget`` when the whole does."""
    sizes = {} if sizes is None else sizes
    size = expanded_size(value, sizes)
    if size <= budget:
        return size
    while True:  # descend to the value that is too large, to point at it
        items = (list(zip(value.values(), (value.value_locs.get(k, loc) for k in value))) if isinstance(value, LocMap)
                 else list(zip(value, value.item_locs)) if isinstance(value, LocList) else [])
        larger = next(((child, child_loc) for child, child_loc in items if sizes[id(child)] > budget), None)
        if larger is None:
            break
        value, loc = larger
    raise loc.error(f"this value expands to {sizes[id(value)]:,} values, more than the {budget:,} a spec may hold",
                    hint="YAML aliases (*name) and repeat blocks multiply what they copy; write the value out")

