"""YAML loading that is bounded and remembers where every key and value stands.

`load_with_positions` returns the plain data (as `yaml.safe_load` would) and a map from each
key path, e.g. ``("items", 0, "prompt")``, to the 1-based line and column of that node. Before
anything is built it counts the document's nodes *as expanded* (an alias counts as everything
it points at) and its nesting depth from the event stream, so a small file whose aliases
expand to billions of nodes is refused in linear time and memory (`YamlRefused`). Duplicate
keys, non-scalar keys and infinite or NaN numbers are refused at their line too.
`closest_position` finds the nearest known node for a path that is missing from the file
(a required field nobody wrote), and `snippet` renders the offending line with a caret.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

Path_ = tuple[str | int, ...]

MAX_NODES = 250_000  # after alias expansion; 10,000 items of a dozen fields fit
MAX_DEPTH = 32
FLOAT_TAG = "tag:yaml.org,2002:float"
MERGE_TAG = "tag:yaml.org,2002:merge"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built in: ~10x faster, same nodes
USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s\"']+@")  # a URL's user:password, never shown


@dataclass(frozen=True)
class Position:
    """A 1-based line and column in a YAML text."""

    line: int
    column: int


class YamlRefused(ValueError):
    """A YAML text that is well-formed but not acceptable: too large as expanded, too deep,
    a key given twice, a non-scalar key or a number that is not finite."""

    def __init__(self, message: str, position: Position, path: Path_ = ()) -> None:
        super().__init__(message)
        self.message, self.position, self.path = message, position, path


def _pos(mark: Any) -> Position:
    return Position(mark.line + 1, mark.column + 1)


def check_size(text: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a document whose expanded node count or depth passes the limits, from the
    parser's events alone (no tree is built, aliases are sizes, not copies)."""
    sizes: dict[str, int] = {}
    stack: list[list[Any]] = []  # [count so far, anchor]
    total = 0
    for event in yaml.parse(text, Loader=Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= max_depth:
                raise YamlRefused(f"nested more than {max_depth} levels deep", _pos(event.start_mark))
            stack.append([1, event.anchor])
            added = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            count, anchor = stack.pop()
            if anchor:
                sizes[anchor] = count
            if stack:
                stack[-1][0] += count
            continue
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                sizes[event.anchor] = 1
            added = 1
        elif isinstance(event, yaml.AliasEvent):
            added = sizes.get(event.anchor, 1)
        else:
            continue
        if stack and not isinstance(event, yaml.CollectionStartEvent):
            stack[-1][0] += added
        total += added
        if total > max_nodes:
            raise YamlRefused(f"expands to more than {max_nodes:,} YAML nodes (aliases count as what they repeat)",
                              _pos(event.start_mark))


def _walk(root: yaml.Node, loader: Any, out: dict[Path_, Position]) -> None:
    """Record positions and refuse duplicate/non-scalar keys and non-finite numbers; each node
    object is visited once, so an alias is never expanded."""
    seen: set[int] = set()
    todo: list[tuple[yaml.Node, Path_]] = [(root, ())]
    while todo:
        node, path = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise YamlRefused("a key must be a plain value, not a list or mapping",
                                      _pos(key_node.start_mark), path)
                merge = key_node.tag == MERGE_TAG
                key = MERGE_TAG if merge else loader.construct_object(key_node)
                child = (*path, key_node.value)
                if key in keys and not merge:
                    first = keys[key].start_mark.line + 1
                    raise YamlRefused(f"duplicate key {key_node.value!r} (first given on line {first}); "
                                      "a key may appear once in a mapping", _pos(key_node.start_mark), child)
                keys[key] = key_node
                # A key's own position is where a reader looks for it; the value follows it.
                out[child] = _pos(key_node.start_mark)
                out[(*child, "<value>")] = _pos(value_node.start_mark)
                todo.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                out[child] = _pos(item.start_mark)
                todo.append((item, child))
        elif node.tag == FLOAT_TAG and not math.isfinite(loader.construct_object(node)):
            raise YamlRefused(f"{node.value!r} is not a finite number", _pos(node.start_mark), path)


def load_with_positions(text: str) -> tuple[Any, dict[Path_, Position]]:
    """Parse one YAML document; raise `yaml.YAMLError` (with a mark) when it is not YAML and
    `YamlRefused` when it is too large, too deep or ambiguous."""
    check_size(text)
    loader = Loader(text)
    positions: dict[Path_, Position] = {(): Position(1, 1)}
    try:
        node = loader.get_single_node()
        if node is not None:
            _walk(node, loader, positions)  # before construction, which rewrites merge keys
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, positions


def closest_position(path: Path_, positions: dict[Path_, Position], *, value: bool = False) -> Position:
    """The position of `path`, or of its nearest ancestor that the file contains."""
    for cut in range(len(path), -1, -1):
        prefix = tuple(path[:cut])
        if value and cut == len(path) and (*prefix, "<value>") in positions:
            return positions[(*prefix, "<value>")]
        if prefix in positions:
            return positions[prefix]
    return Position(1, 1)


def snippet(text: str, pos: Position, context: int = 0) -> str:
    """The offending line (and `context` lines around it), numbered, with a caret under the
    column; at most 200 characters a line, and a URL's user and password masked."""
    lines = text.splitlines() or [""]
    if pos.line > len(lines):
        return ""
    first = max(1, pos.line - context)
    last = min(len(lines), pos.line + context)
    width = len(str(last))
    out = []
    for number in range(first, last + 1):
        shown = USERINFO.sub(r"\1***@", lines[number - 1][:200])
        out.append(f"  {number:>{width}} | {shown}")
        if number == pos.line and pos.column <= 200:
            out.append(f"  {'':>{width}} | {' ' * (pos.column - 1)}^")
    return "\n".join(out)
