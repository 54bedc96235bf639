"""Catalogue-driven specs: `items_from` (CSV or JSONL) with templates and a matrix expands into
ordinary items with stable ids; every problem is named at its place (the spec's line for a
template, the catalogue's file and line for a row), several at once; the expansion is capped.
Run on the sandbox on all three providers: a rerun pays nothing, a new row pays once."""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path

import pytest

from flows.specs.spec import SpecError, load_spec
from tests.conftest import TEST_BUCKET, run_spec

SPEC = """\
version: 1
name: {name}
provider: tams
blocks: {{tams: sandbox, chuzhan: sandbox, tencent: sandbox}}
generate: {{width: 768, height: 768, steps: 20, provider_options: {{tencent: {{LogoAdd: 0}}}}}}
items_from:
  path: {path}
  id: "{{sku}}-{{style}}"
  prompt: "a {{color}} {{name}}, {{style}} photo"
  provider: "{{provider}}"
matrix:
  style: [studio, lifestyle]
archive: {{bucket: {bucket}, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 60, max_parallel: 4}}
"""
ROWS = "sku,name,color,provider\nSNK-01,sneaker,red,tams\nBAG-02,backpack,blue,chuzhan\nLMP-03,lamp,brass,tencent\n"


def write(tmp_path: Path, rows: str = ROWS, name: str = "cat", path: str = "products.csv",
          edits: dict[str, str] | None = None) -> Path:
    (tmp_path / path).write_text(rows)
    text = SPEC.format(name=name, path=path, bucket=TEST_BUCKET)
    for old, new in (edits or {}).items():
        assert old in text
        text = text.replace(old, new)
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(text)
    return spec


def problems(spec: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    return [f"{Path(i.file).name}:{i.line}: {i.message}" for i in caught.value.issues]


def test_rows_times_the_matrix_make_items_with_stable_ids(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path))
    ids = [spec.item_id(n) for n in range(len(spec.items))]
    assert ids == ["snk-01-studio", "snk-01-lifestyle", "bag-02-studio", "bag-02-lifestyle", "lmp-03-studio",
                   "lmp-03-lifestyle"]
    assert spec.items[0].prompt == "a red sneaker, studio photo" and spec.items[2].provider == "chuzhan"
    assert [spec.item_id(n) for n in range(6)] == ids  # the same on every load and date


def test_jsonl_rows_are_the_same_items(tmp_path: Path) -> None:
    lines = "".join(json.dumps(dict(zip(["sku", "name", "color", "provider"], r.split(",")))) + "\n"
                    for r in ROWS.splitlines()[1:])
    spec = load_spec(write(tmp_path, rows=lines, path="products.jsonl"))
    assert spec.items[1].prompt == "a red sneaker, lifestyle photo" and len(spec.items) == 6


def test_a_template_naming_an_unknown_column_points_at_the_spec_line(tmp_path: Path) -> None:
    spec = write(tmp_path, edits={"{color}": "{colour}"})
    [issue] = problems(spec)
    assert issue.startswith("cat.yaml:9: {colour} names no column")


def test_the_id_must_name_every_matrix_key(tmp_path: Path) -> None:
    [issue] = problems(write(tmp_path, edits={'"{sku}-{style}"': '"{sku}"'}))
    assert issue.startswith("cat.yaml:8: the id template must name every matrix key") and "{style}" in issue


def test_row_problems_are_named_at_the_catalogue_line_several_at_once(tmp_path: Path) -> None:
    rows = ROWS + "HAT-04,,green,tams\nSNK-01,sneaker,red,tams\nBAD,row\n\"unclosed,x,y,tams\n"
    found = problems(write(tmp_path, rows=rows))
    assert found[0] == "products.csv:5: column 'name' is empty (items_from.prompt uses it)"
    assert found[1] == "products.csv:6: duplicate item id 'snk-01-studio' (also line 2)"
    assert found[2] == "products.csv:7: 2 field(s) where the header has 4"
    assert len(found) >= 3


def test_a_rows_value_the_spec_refuses_is_named_at_the_row_once_with_the_row(tmp_path: Path) -> None:
    """A value checked by the spec's rules (not the catalogue's) is still the row's problem: told
    at its line, with the row, once for all its matrix values (it was the spec's line 1, twice)."""
    rows = ROWS.replace("blue,chuzhan", "blue,chuzan")
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, rows=rows))
    [issue] = caught.value.issues
    assert (Path(issue.file).name, issue.line, issue.field) == ("products.csv", 3, "provider"), issue
    assert issue.message == "'chuzan' is no provider: it should be 'chuzhan', 'tams' or 'tencent'"
    assert issue.snippet == "  3 | BAG-02,backpack,blue,chuzan"


@pytest.mark.parametrize("rows, says", [
    ("sku,name,color,provider\n", "the catalogue products.csv has no rows after its header"),
    ("", "the catalogue products.csv has no rows (an empty file)"),
])
def test_a_catalogue_with_no_rows_is_refused_at_its_path_in_the_spec(tmp_path: Path, rows: str, says: str) -> None:
    [issue] = problems(write(tmp_path, rows=rows))
    assert issue.startswith(f"cat.yaml:7: {says}: check that it is the file meant"), issue


def test_ids_made_of_characters_an_id_drops_name_the_fix(tmp_path: Path) -> None:
    rows = "sku,name,color,provider\n连衣裙,dress,red,tams\n衬衫,shirt,blue,tams\n"
    issue, second = problems(write(tmp_path, rows=rows, edits={'"{sku}-{style}"': '"{sku}{style}"',
                                                               "style: [studio, lifestyle]": "style: [正面]"}))
    assert second.startswith("products.csv:3: the id template makes no id of '衬衫正面'")
    assert issue.startswith("products.csv:2: the id template makes no id of '连衣裙正面'")
    assert "a SKU, a row number" in issue
    found = problems(write(tmp_path, rows=rows))
    assert found == ["products.csv:3: duplicate item id 'studio': '衬衫-studio' and '连衣裙-studio' (line 2) make the same id "
                     "(an id keeps only a-z, 0-9, '.', '_' and '-'); build items_from.id from a column that tells them "
                     "apart (a SKU, a row number)"]


def test_ids_that_differ_only_past_63_characters_say_so(tmp_path: Path) -> None:
    """Two SKUs alike in their first 63 characters made one id: the message said it was the
    characters an id drops, and to use a SKU, which it already was."""
    sku = "COLLECTION-2026-SPRING-WOMENS-RUNNING-SHOE-ULTRALIGHT-MESH-RED-SIZE-"
    rows = f"sku,name,color,provider\n{sku}38,shoe,red,tams\n{sku}39,shoe,red,tams\n"
    found = problems(write(tmp_path, rows=rows))  # ids "{sku}-{style}": the style is past the 63rd character
    assert found and all(f.startswith("products.csv:") and "duplicate item id" in f for f in found), found
    assert all("differ only after their first 63 characters" in f and "'{size}-{sku}'" in f for f in found), found


@pytest.mark.parametrize("content, says", [
    (b"sku,name\n\x00\x01\x02", "a binary file"),
    (b"sku,name,color,provider\nA,caf\xe9,red,tams\n", "not UTF-8 text"),
])
def test_an_unreadable_catalogue_is_refused_at_its_line(tmp_path: Path, content: bytes, says: str) -> None:
    spec = write(tmp_path)
    (tmp_path / "products.csv").write_bytes(content)
    [issue] = problems(spec)
    assert says in issue and issue.startswith("products.csv:")


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    rows = '{"sku": "A", "name": "n", "color": "c", "provider": "tams"}\n[1, 2]\n'
    [issue] = problems(write(tmp_path, rows=rows, path="products.jsonl"))
    assert issue == "products.jsonl:2: a JSONL line must be an object, not list"


def test_the_expansion_is_capped_and_says_how_to_raise_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IMAGEGEN_MAX_CATALOGUE_ITEMS", "4")
    [issue] = problems(write(tmp_path))
    assert "more than 4 items (IMAGEGEN_MAX_CATALOGUE_ITEMS raises the cap)" in issue


def test_a_catalogue_outside_the_spec_folder_is_refused(tmp_path: Path) -> None:
    spec = write(tmp_path)
    spec.write_text(spec.read_text().replace("path: products.csv", "path: ../../etc/passwd.csv"))
    [issue] = problems(spec)
    assert "outside the spec's folder" in issue


def test_a_catalogue_runs_on_three_providers_then_pays_nothing_again_and_once_for_a_new_row(
        sandbox_blocks, tmp_path) -> None:
    from tests.test_pay_once import charges

    name, day = "cat-run", date(2026, 9, 1)
    spec = write(tmp_path, name=name, edits={"{style} photo": "{style} photo of " + name})
    assert run_spec(tmp_path, spec.read_text(), day, path=spec).is_completed()
    paid = {p: charges(sandbox_blocks, p, name) for p in ("tams", "chuzhan", "tencent")}
    assert all(len(v) == 2 and set(v.values()) == {1} for v in paid.values()), paid  # two styles each, once
    assert run_spec(tmp_path, spec.read_text(), day, path=spec).is_completed()
    assert {p: charges(sandbox_blocks, p, name) for p in paid} == paid  # the rerun pays nothing
    (tmp_path / "products.csv").write_text(ROWS + "CAP-04,cap,green,tams\n")
    assert run_spec(tmp_path, spec.read_text(), day, path=spec).is_completed()
    after = charges(sandbox_blocks, "tams", name)
    assert len(after) == 4 and set(after.values()) == {1}  # the new row's two items, once each


def test_a_value_that_is_not_text_or_a_number_is_refused_at_its_line(tmp_path: Path) -> None:
    """A list, an object, true or an infinite number was put in the prompt as Python's text of it
    ("a {'a': 1}", "a True", "a inf") and paid for; a key or column given twice kept one silently."""
    rows = ('{"sku": "A1", "name": "cup", "color": "red", "provider": "tams"}\n'
            '{"sku": "A2", "name": {"a": 1}, "color": "red", "provider": "tams"}\n'
            '{"sku": "A3", "name": "cup", "color": true, "provider": "tams"}\n'
            '{"sku": "A4", "name": "cup", "color": 1e999, "provider": "tams"}\n'
            '{"sku": "A5", "name": "cup", "name": "mug", "color": "red", "provider": "tams"}\n')
    found = problems(write(tmp_path, rows, path="products.jsonl"))
    assert found[0] == 'products.jsonl:2: \'name\': {"a": 1} is not text or a finite number', found
    assert found[1:3] == ["products.jsonl:3: 'color': true is not text or a finite number",
                          "products.jsonl:4: 'color': inf is not text or a finite number"], found
    assert found[3].startswith("products.jsonl:5: not JSON: key 'name' is given twice"), found
    twice = problems(write(tmp_path, "sku,name,name,color,provider\nA1,cup,mug,red,tams\n", name="twice"))
    assert twice == ["products.csv:1: column 'name' is in the header twice: which one is meant? Name each column once"]


def test_a_matrix_is_checked_before_it_is_made(tmp_path: Path) -> None:
    """Its values are text or numbers; 100 x 100 x 100 combinations are refused from their
    count (they were made first: about 590 MB and 6 s for a spec under 1 KB)."""
    odd = problems(write(tmp_path, edits={"style: [studio, lifestyle]": "style: [studio, [a, b]]"}))
    assert odd == ['cat.yaml:12: ["a", "b"] is not text or a finite number: a matrix value is text or a number'], odd
    big = "{" + ", ".join(f"k{n}: [{', '.join(str(v) for v in range(100))}]" for n in range(3)) + "}"
    edits = {"style: [studio, lifestyle]": f"style: [studio]\n  {big[1:-1].replace(', k', chr(10) + '  k')}",
             'id: "{sku}-{style}"': 'id: "{sku}-{style}-{k0}-{k1}-{k2}"'}
    huge = problems(write(tmp_path, name="huge", edits=edits))
    assert any("1,000,000 combinations, more than the 50,000 items" in p for p in huge), huge


@pytest.mark.parametrize("seed", ["-1", "4294967296", "²", "12a"])
def test_a_seed_column_out_of_the_spec_s_range_names_the_range(tmp_path: Path, seed: str) -> None:
    """A seed of -1 was "not a whole number", and a huge one went on to the spec's own words."""
    rows = "sku,name,color,provider,seed\nSNK-01,sneaker,red,tams,%s\n" % seed
    spec = write(tmp_path, rows=rows, edits={'provider: "{provider}"': 'provider: "{provider}"\n  seed: "{seed}"'})
    [issue] = problems(spec)
    assert issue == f"products.csv:2: seed {seed!r} is not a whole number from 0 to 4294967295", issue


@pytest.mark.parametrize("kind, says", [("missing", "does not exist"), ("folder", "is a folder"),
                                        ("pipe", "is no regular file (a pipe or a device is not read)")])
def test_a_catalogue_path_that_is_no_file_says_what_it_is(tmp_path: Path, kind: str, says: str) -> None:
    """A pipe was "no catalogue file", as a typo was: reading one would hang the run."""
    spec = write(tmp_path)
    (tmp_path / "products.csv").unlink()
    if kind == "folder":
        (tmp_path / "products.csv").mkdir()
    elif kind == "pipe":
        os.mkfifo(tmp_path / "products.csv")
    [issue] = problems(spec)
    assert issue.endswith(f"the catalogue 'products.csv' {says}: give a CSV or JSON Lines file beside the spec"), issue


def test_a_catalogue_linked_from_outside_names_the_target_s_folder(tmp_path: Path) -> None:
    """A link's message named the spec's own folder as the one to add to IMAGEGEN_INPUT_ROOTS."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "real.csv").write_text(ROWS)
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    spec = write(spec_dir)
    (spec_dir / "products.csv").unlink()
    (spec_dir / "products.csv").symlink_to(elsewhere / "real.csv")
    [issue] = problems(spec)
    assert f"(a link to {elsewhere / 'real.csv'}) is outside the spec's folder" in issue, issue
    assert f"add {elsewhere} to IMAGEGEN_INPUT_ROOTS" in issue, issue
