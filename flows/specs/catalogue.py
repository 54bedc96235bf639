"""Items from a catalogue: a CSV (with a header row) or JSONL file, prompt templates and a matrix.

A spec's `items_from` names the file and templates; `matrix` makes each row once per
combination of its values. `expand()` turns them into ordinary `items:` entries before the
spec is validated, so ids, reruns, budgets, `--items` and the ledger treat them as any other
item. The file is read as a stream, one row at a time, and never twice; reading stops (and the
spec is refused) once the expansion passes `max_items()`.

Errors name their place: a template naming an unknown field points at the spec's line; a
row's problem at the catalogue's file and line (`products.csv:7: ...`), several at once.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import math
import os
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.specs import confine

MAX_ITEMS_SETTING = "IMAGEGEN_MAX_CATALOGUE_ITEMS"
MAX_ITEMS = 50_000
"""Items a catalogue may expand to (rows x matrix combinations); `IMAGEGEN_MAX_CATALOGUE_ITEMS` raises it."""
MAX_ERRORS = 20
TEMPLATES = ("id", "prompt", "negative_prompt", "input_image", "seed", "provider")
REQUIRED = ("path", "id", "prompt")


class CatalogueError(ValueError):
    """Problems found in a catalogue or its templates: `(file, line, column, field, message)` each."""

    def __init__(self, problems: list[tuple[str, int, int, str, str]]) -> None:
        super().__init__("; ".join(p[4] for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Template:
    """A `{column}` template; `{{` and `}}` are literal braces."""

    key: str
    text: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, key: str, text: Any) -> Template:
        if not isinstance(text, str | int):
            raise ValueError(f"items_from.{key} must be a text template such as \"{{column}}\"")
        text = str(text)
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"items_from.{key}: malformed template ({exc}); write {{{{ and }}}} for braces") from None
        fields = []
        for _, field, spec, conversion in parts:
            if field is None:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ .-]*", field) or spec or conversion:
                raise ValueError(f"items_from.{key}: {{{field}{'!' + conversion if conversion else ''}"
                                 f"{':' + spec if spec else ''}}} is not a plain {{column}} field")
            fields.append(field)
        return cls(key, text, tuple(fields))

    def render(self, values: dict[str, str]) -> str:
        return self.text.format_map(values)


def max_items() -> int:
    text = os.environ.get(MAX_ITEMS_SETTING, "")
    return int(text) if text.isdigit() and int(text) > 0 else MAX_ITEMS


MAX_SEED = 4_294_967_295  # an item's seed, in a catalogue or a spec: every provider takes it
MAX_ID = 63  # an item id's length (the spec's SLUG): a longer rendered id keeps its first 63 characters


def slug(text: str) -> str:
    """An item id from a rendered id template: lowercase, runs of other characters as `-`."""
    return _cleaned(text)[:MAX_ID]


def _cleaned(text: str) -> str:
    """`slug` before it is cut to `MAX_ID` characters."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-._")


def rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """`(line, row)` for each data row of a .csv (header first) or .jsonl file, streamed; a row
    that cannot be read is `(line, message)`."""
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise CatalogueError([(str(path), 1, 1, "", "a catalogue is a .csv file with a header row or a .jsonl file")])
    with path.open("rb") as raw:
        head = raw.read(8192)
        if b"\0" in head:
            raise CatalogueError([(str(path), 1, 1, "", "a binary file, not a text catalogue")])
        raw.seek(0)
        lines = _decoded_lines(raw, path)
        yield from (_csv_rows(lines) if path.suffix.lower() == ".csv" else _jsonl_rows(lines))


def _decoded_lines(raw: Any, path: Path) -> Iterator[tuple[int, str]]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    for number, line in enumerate(raw, start=1):
        try:
            yield number, decoder.decode(line)
        except UnicodeDecodeError as exc:
            raise CatalogueError([(str(path), number, exc.start + 1, "",
                                   f"not UTF-8 text (byte 0x{line[exc.start]:02x}); save the file as UTF-8")]) from None


def _csv_rows(lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    numbered = iter(lines)
    current = [0]

    def texts() -> Iterator[str]:
        for number, text in numbered:
            current[0] = number
            yield text

    reader = csv.reader(texts())
    header = _next_cells(reader)
    if isinstance(header, str):
        yield current[0], f"unreadable header row: {header}"
    if not isinstance(header, list):
        return
    header = [h.strip() for h in header]
    if twice := sorted({h for h in header if header.count(h) > 1}):
        yield current[0], f"column {twice[0]!r} is in the header twice: which one is meant? Name each column once"
        return
    while (cells := _next_cells(reader)) is not None:
        if isinstance(cells, str):
            yield current[0], f"malformed CSV row: {cells}"
            continue
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield current[0], f"{len(cells)} field(s) where the header has {len(header)}"
            continue
        yield current[0], dict(zip(header, cells, strict=True))


def _next_cells(reader: Any) -> list[str] | str | None:
    """The next CSV row's cells, why it cannot be read, or None at the end."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        return str(exc)


def _jsonl_rows(lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for number, text in lines:
        if not text.strip():
            continue
        try:
            row = json.loads(text, object_pairs_hook=_once_each)
        except ValueError as exc:
            yield number, f"not JSON: {exc}"
            continue
        if not isinstance(row, dict):
            yield number, f"a JSONL line must be an object, not {type(row).__name__}"
            continue
        if (why := next((f"{k!r}: {bad}" for k, v in row.items() if (bad := not_a_value(v))), None)) is not None:
            yield number, why
            continue
        yield number, {k: "" if v is None else v for k, v in row.items()}


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once (json keeps the last of two silently)."""
    keys = [k for k, _ in pairs]
    if twice := next((k for k in keys if keys.count(k) > 1), None):
        raise ValueError(f"key {twice!r} is given twice: which one is meant?")
    return dict(pairs)


def not_a_value(value: Any) -> str | None:
    """Why a catalogue or matrix value cannot be put in a template (a list, an object, true or
    an infinite number would be Python's text of it), or None for text, a finite number or null."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return None
    return f"{json.dumps(value)[:40] if not isinstance(value, float) else value} is not text or a finite number"


def templates(source: dict[str, Any], matrix: dict[str, list[Any]]) -> dict[str, Template]:
    """The templates of `items_from`, checked against each other and the matrix."""
    problems: list[tuple[str, int, int, str, str]] = []
    unknown = sorted(set(source) - {"path", *TEMPLATES})
    problems += [("", 0, 0, f"items_from.{k}", f"unknown key (one of path, {', '.join(TEMPLATES)})") for k in unknown]
    problems += [("", 0, 0, "items_from", f"items_from needs `{k}`") for k in REQUIRED if k not in source]
    parsed: dict[str, Template] = {}
    for key in TEMPLATES:
        if key in source:
            try:
                parsed[key] = Template.parse(key, source[key])
            except ValueError as exc:
                problems.append(("", 0, 0, f"items_from.{key}", str(exc)))
    if "id" in parsed:
        missing = [k for k in matrix if k not in parsed["id"].fields]
        if missing:
            problems.append(("", 0, 0, "items_from.id", f"the id template must name every matrix key, so each "
                             f"combination has its own id: add {', '.join('{' + k + '}' for k in missing)}"))
    if problems:
        raise CatalogueError(problems)
    return parsed


def check_matrix(matrix: Any) -> dict[str, list[Any]]:
    if matrix is None:
        return {}
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        raise CatalogueError([("", 0, 0, "matrix", "matrix maps each key to a non-empty list of values")])
    bad = [(k, why) for k, values in matrix.items() for v in values if v is not None and (why := not_a_value(v))]
    bad += [(k, "null is no value") for k, values in matrix.items() if None in values]
    if bad:
        raise CatalogueError([("", 0, 0, f"matrix.{bad[0][0]}", f"{bad[0][1]}: a matrix value is text or a number")])
    if (combinations := math.prod(len(v) for v in matrix.values())) > max_items():
        raise CatalogueError([("", 0, 0, "matrix", f"{combinations:,} combinations, more than the {max_items():,} items "
                               f"a catalogue may make ({MAX_ITEMS_SETTING} raises the cap)")])
    return {str(k): v for k, v in matrix.items()}


def catalogue_path(path: Any, base_dir: Path | None) -> Path:
    """The catalogue file, inside the spec's folder (or `IMAGEGEN_INPUT_ROOTS`), as inputs are."""
    if not isinstance(path, str) or not path.strip():
        raise CatalogueError([("", 0, 0, "items_from.path", "give the catalogue's path, beside the spec")])
    if "://" in path:
        raise CatalogueError([("", 0, 0, "items_from.path", "a catalogue is a file beside the spec (s3:// and URLs "
                               "are not read; copy the file next to the spec)")])
    full = (base_dir or Path.cwd()) / path
    try:
        confine.check_local_input(full, base_dir)
    except confine.InputRefused as exc:
        raise CatalogueError([("", 0, 0, "items_from.path", str(exc).replace("input image", "catalogue"))]) from None
    if not full.is_file():
        what = ("is a folder" if full.is_dir() else "is no regular file (a pipe or a device is not read)"
                if full.exists() else "does not exist")
        raise CatalogueError([("", 0, 0, "items_from.path", f"the catalogue {path!r} {what}: give a CSV or JSON "
                               "Lines file beside the spec")])
    return full


@dataclass(frozen=True)
class Made:
    """The items a catalogue made, and for each the catalogue's name and the line of its row."""

    items: list[dict[str, Any]]
    label: str
    lines: list[int]
    path: Path

    def row_texts(self, lines: set[int]) -> dict[int, str]:
        """The text of each of `lines` of the catalogue (for errors' snippets), cut to 200
        characters, in one pass over the file (one pass per error was quadratic in a catalogue
        whose every row is refused)."""
        found: dict[int, str] = {}
        with self.path.open("rb") as raw:
            for number, text in enumerate(raw, start=1):
                if number in lines:
                    found[number] = text.decode("utf-8-sig", errors="replace").rstrip("\r\n")[:200]
                    if len(found) == len(lines):
                        break
        return found


def expand(source: Any, matrix: Any, base_dir: Path | None) -> Made:
    """The items a catalogue makes, in file order, each combination of the matrix in turn;
    `CatalogueError` with every problem found (at most `MAX_ERRORS`), or for a catalogue with no
    rows (a wrong or truncated file, most likely)."""
    if not isinstance(source, dict):
        raise CatalogueError([("", 0, 0, "items_from", "items_from is a mapping: path, id, prompt, ...")])
    combos = check_matrix(matrix)
    parsed = templates(source, combos)
    path = catalogue_path(source.get("path"), base_dir)
    label, limit = str(source["path"]), max_items()
    items: list[dict[str, Any]] = []
    lines: list[int] = []
    seen: dict[str, tuple[int, str]] = {}  # id -> (line, the id template's text there)
    problems: list[tuple[str, int, int, str, str]] = []
    checked_columns = False
    for line, row in rows(path):
        if len(problems) >= MAX_ERRORS:
            break
        if isinstance(row, str):
            problems.append((label, line, 1, "", row))
            continue
        if not checked_columns and path.suffix.lower() == ".csv":
            checked_columns = True
            _check_columns(parsed, set(row) | set(combos))
        for combination in _combinations(combos):
            values = {**{k: str(v) for k, v in row.items()}, **combination}
            item, why = _item(parsed, values)
            rendered = parsed["id"].render(values) if why is None else ""  # made: every field is there
            if why is None and item["id"] in seen:
                why = _duplicate(item["id"], rendered, *seen[item["id"]])
            if why is not None:
                problems.append((label, line, 1, "", why))
                break
            seen[item["id"]] = (line, rendered)
            items.append(item)
            lines.append(line)
        if len(items) > limit:
            problems.append((label, line, 1, "", f"more than {limit:,} items ({MAX_ITEMS_SETTING} raises the cap); "
                             "split the catalogue or the matrix"))
            break
    if problems:
        raise CatalogueError(problems)
    if not items:
        raise CatalogueError([("", 0, 0, "items_from.path", f"the catalogue {label} has no rows"
                               + (" after its header" if path.stat().st_size else " (an empty file)")
                               + ": check that it is the file meant, and that it was written in full")])
    return Made(items, label, lines, path)


def _check_columns(parsed: dict[str, Template], known: set[str]) -> None:
    problems = [("", 0, 0, f"items_from.{t.key}", f"{{{f}}} names no column of the catalogue or matrix key "
                 f"(known: {', '.join(sorted(known))})") for t in parsed.values() for f in t.fields if f not in known]
    if problems:
        raise CatalogueError(problems)


def _combinations(combos: dict[str, list[Any]]) -> Iterator[dict[str, str]]:
    keys = list(combos)
    for values in itertools.product(*(combos[k] for k in keys)):
        yield {k: str(v) for k, v in zip(keys, values, strict=True)}


ID_CHARACTERS = "an id keeps only a-z, 0-9, '.', '_' and '-'"


def _duplicate(item_id: str, rendered: str, line: int, other: str) -> str:
    """Why an id already made at `line` (from the text `other`) cannot be made again."""
    if rendered.strip().lower() == other.strip().lower():
        return f"duplicate item id {item_id!r} (also line {line})"
    whole = [_cleaned(text) for text in (rendered, other)]
    if whole[0] != whole[1] and max(map(len, whole)) > MAX_ID:
        return (f"duplicate item id {item_id!r}: {rendered!r} and {other!r} (line {line}) differ only after their "
                f"first {MAX_ID} characters, and an id keeps {MAX_ID}; put the part that tells them apart first in "
                "items_from.id (such as '{size}-{sku}'), or shorten it")
    return (f"duplicate item id {item_id!r}: {rendered!r} and {other!r} (line {line}) make the same id "
            f"({ID_CHARACTERS}); build items_from.id from a column that tells them apart (a SKU, a row number)")


def _item(parsed: dict[str, Template], values: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    """One item from one row and combination, or why it cannot be made."""
    for template in parsed.values():
        for field in template.fields:
            if field not in values:
                return {}, f"column {field!r} is missing (items_from.{template.key} uses it)"
            if template.key in REQUIRED and not values[field].strip():
                return {}, f"column {field!r} is empty (items_from.{template.key} uses it)"
    rendered = parsed["id"].render(values)
    item: dict[str, Any] = {"id": slug(rendered), "prompt": parsed["prompt"].render(values)}
    if not item["id"]:
        return {}, (f"the id template makes no id of {rendered!r} ({ID_CHARACTERS}); build items_from.id "
                    "from a column that has them (a SKU, a row number)")
    for key in ("negative_prompt", "input_image", "provider"):
        if key in parsed and (text := parsed[key].render(values).strip()):
            item[key] = text
    if "seed" in parsed and (text := parsed["seed"].render(values).strip()):
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_SEED:
            return {}, f"seed {text!r} is not a whole number from 0 to {MAX_SEED}"
        item["seed"] = int(text)
    return item, None
