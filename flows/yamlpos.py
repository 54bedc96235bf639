"""YAML loading that remembers where every key and value stands, for errors that name a line.

`load_with_positions` returns the plain data (as `yaml.safe_load` would) and a map from each
key path, e.g. ``("items", 0, "prompt")``, to the 1-based line and column of that node.
`closest_position` finds the nearest known node for a path that is missing from the file
(a required field nobody wrote), and `snippet` renders the lines around it with a caret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Position:
    """A 1-based line and column in a YAML text."""

    line: int
    column: int


def _walk(node: yaml.Node, path: Path_, out: dict[Path_, Position]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            # A key's own position is where a reader looks for it; the value follows it.
            out[child] = Position(key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[(*child, "<value>")] = Position(
                value_node.start_mark.line + 1, value_node.start_mark.column + 1
            )
            _walk(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            out[child] = Position(item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, child, out)


def load_with_positions(text: str) -> tuple[Any, dict[Path_, Position]]:
    """Parse one YAML document; raise `yaml.YAMLError` (with a mark) when it is not YAML."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    positions: dict[Path_, Position] = {(): Position(1, 1)}
    if node is not None:
        _walk(node, (), positions)
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


def snippet(text: str, pos: Position, context: int = 1) -> str:
    """The lines around `pos`, numbered, with a caret under the column."""
    lines = text.splitlines() or [""]
    first = max(1, pos.line - context)
    last = min(len(lines), pos.line + context)
    width = len(str(last))
    out = []
    for number in range(first, last + 1):
        out.append(f"  {number:>{width}} | {lines[number - 1]}")
        if number == pos.line:
            out.append(f"  {'':>{width}} | {' ' * (pos.column - 1)}^")
    return "\n".join(out)
