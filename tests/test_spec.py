"""Spec loading: every error names file, line and field, with a snippet."""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from flows.specs.spec import SpecError, load_spec
from flows.storage import render_key

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
version: 1
name: shots
provider: tams
generate:
  width: 512
  height: 512
archive:
  bucket: imagegen-test
items:
  - id: one
    prompt: a cat
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def issue_of(tmp_path: Path, text: str):
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, text))
    return caught.value.issues


def test_good_spec_loads(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.name == "shots" and spec.items[0].prompt == "a cat"
    assert spec.archive.key_template == "{pipeline}/{run_date}/{item}-{index}.png"


@pytest.mark.parametrize(("text", "line", "field", "message"), [
    pytest.param(GOOD.replace("  - id: one\n", "  - id: [one\n"), 11, "", "invalid YAML", id="bad-yaml"),
    pytest.param(GOOD.replace("    prompt: a cat\n", '    prompt: "a cat\n'), 11, "",  # not the file's end, as PyYAML says
                 "invalid YAML: a quoted value opened here is never closed", id="quote-never-closed"),
    pytest.param(GOOD.replace("  width: 512\n", "  widht: 512\n"), 5, "generate.widht",
                 "unknown key (did you mean width?)", id="unknown-key"),
    pytest.param(GOOD.replace("  width: 512\n", "  zzzz: 512\n"), 5, "generate.zzzz", "unknown key", id="unknown-key-far"),
    pytest.param(GOOD.replace("    prompt: a cat\n", "    prompt: a cat\n    sed: 3\n"), 12, "items[0].sed",
                 "unknown key (did you mean seed?)", id="unknown-item-key"),
    pytest.param(GOOD.replace("  height: 512\n", "  height: tall\n"), 6, "generate.height", "integer",
                 id="wrong-type"),
    pytest.param(GOOD.replace("    prompt: a cat\n", "    seed: 3\n"), 10, "items[0].prompt", "Field required",
                 id="missing-prompt"),
    pytest.param(GOOD.replace("  width: 512\n", "  width: -512\n"), 5, "generate.width", "greater than 0",
                 id="negative-size"),
    pytest.param(GOOD.replace("provider: tams\n", "provider: midjourney\n"), 3, "provider", "'tams'",
                 id="unknown-provider"),
    pytest.param(GOOD.replace("  bucket: imagegen-test\n",
                              "  bucket: imagegen-test\n  key_template: \"{pipeline}/{date}/{item}.png\"\n"),
                 9, "archive.key_template", "unknown field(s) {date}", id="bad-date-template"),
    pytest.param(GOOD.replace("  - id: one\n    prompt: a cat\n", "  []\n").replace("items:\n", "items:"),
                 9, "items", "at least 1 item", id="empty-items"),
    pytest.param(GOOD + "  - id: one\n    prompt: a dog\n", 12, "items[1].id", "duplicate item id",
                 id="duplicate-id"),
    pytest.param(GOOD.replace("    prompt: a cat\n", "    prompt: a cat\n    input_image: missing.png\n"), 12,
                 "items[0].input_image", "input image not found", id="missing-input-image"),
    pytest.param(GOOD.replace("    prompt: a cat\n", "    prompt: a cat\n    count: 2\n").replace(
        "  bucket: imagegen-test\n", "  bucket: imagegen-test\n  key_template: \"{pipeline}/{run_date}/{item}.png\"\n"),
        9, "archive.key_template", "needs {index}", id="count-without-index"),
    pytest.param("- just\n- a list\n", 1, "", "not a pipeline spec", id="not-a-mapping"),
        pytest.param("name: x\n- a list\n", 2, "", "invalid YAML", id="not-a-mapping-either"),
])
def test_bad_spec_names_file_line_and_field(tmp_path: Path, text: str, line: int, field: str, message: str) -> None:
    issues = issue_of(tmp_path, text)
    assert issues, "no issue reported"
    first = issues[0]
    assert first.file.endswith("spec.yaml")
    assert (first.line, first.field) == (line, field), str(first)
    assert message in first.message
    rendered = str(first)
    assert rendered.startswith(f"{first.file}:{line}:")
    if line > 0 and field:
        assert f"{line} |" in first.snippet and "^" in first.snippet


@pytest.mark.parametrize(("run", "message"), [
    ("{max_credits: {tams: -5}}", "the cap of tams should be a number above 0, not -5"),
    ("{max_credits: -5}", "a cap (one number, or one per provider: {tams: 500, tencent: 50}) should be a number above "
                          "0, not -5"),
    ("{max_credits: {tams: abc}}", "the cap of tams should be a number above 0, not 'abc'"),
    ("{max_credits: {tamz: 5}}", "'tamz' is no provider: it should be 'chuzhan', 'tams' or 'tencent'"),
    ("{max_credits: 1e12}", "a cap (one number, or one per provider: {tams: 500, tencent: 50}) should be a number above "
                            "0 ('1e12' is text in YAML: write it as 1.0e+12 with a dot and a sign, or in digits)"),
    ("{poll_interval: \"2\"}", "Input should be a valid number ('2' is text: write it without quotes)"),
])
def test_a_cap_or_number_mistake_is_one_line_saying_why(tmp_path: Path, run: str, message: str) -> None:
    """One line each, in a person's terms (the cap's two forms gave two lines in pydantic's, and a
    YAML `1e12`, which YAML reads as text, was only "not a valid number")."""
    [issue] = issue_of(tmp_path, GOOD + f"run: {run}\n")
    assert (issue.line, issue.field, issue.message) == (12, f"run.{run[1:].split(':')[0]}", message), str(issue)


def test_a_cap_only_for_a_provider_no_item_uses_is_refused_while_the_used_one_goes_uncapped(tmp_path: Path) -> None:
    """`{tencent: 5}` on a TAMS spec capped nothing the run pays for, silently."""
    [issue] = issue_of(tmp_path, GOOD + "run: {max_credits: {tencent: 5}}\n")
    assert (issue.line, issue.field) == (12, "run.max_credits"), str(issue)
    assert issue.message == ("caps tencent, which no item uses, and leaves tams (what the items use) without a cap; "
                             "name it, e.g. {tams: 100}"), issue.message
    assert load_spec(write(tmp_path, GOOD + "run: {max_credits: {tams: 5, tencent: 5}}\n")).budget() == {
        "tams": 5.0, "tencent": 5.0}  # a cap for a provider a catalogue may bring later, beside the used one's


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("  width: 512\n", "  width: -1\n  colour: red\n").replace("provider: tams\n", "provider: x\n")
    fields = {i.field for i in issue_of(tmp_path, text)}
    assert {"generate.width", "generate.colour", "provider"} <= fields


def test_key_template_renders_dates() -> None:
    key = render_key("{pipeline}/{run_date:%Y/%m/%d}/{item}-{index}.png", pipeline="p", run_date=date(2026, 3, 4),
                     item="a", index=2, provider="tams")
    assert key == "p/2026/03/04/a-2.png"


def test_demo_specs_are_valid() -> None:
    for path in Path(__file__).parent.parent.joinpath("pipelines").glob("*.yaml"):
        assert load_spec(path).items


def test_cli_validate(tmp_path: Path) -> None:
    bad = write(tmp_path, GOOD.replace("  height: 512\n", "  height: tall\n"))
    run = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1
    assert f"{bad}:6:11: generate.height:" in run.stderr
    good = write(tmp_path, GOOD)
    run = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(good)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("OK ")


def test_cli_validate_applies_provider_rules(tmp_path: Path) -> None:
    bad = write(tmp_path, GOOD.replace("  width: 512\n", "  width: 500\n"))
    run = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "items[0] (one): tams would refuse it: generate.width: 500 is not a multiple of 64" in run.stderr
    assert f"{bad}:5:3:" in run.stderr  # the shared setting's own line, not the item's
    many = write(tmp_path, bad.read_text() + "".join(f"  - {{id: n{i}, prompt: a dog}}\n" for i in range(3)))
    run = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(many)], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.count("would refuse it") == 1, run.stderr  # told once, not an item
    assert f"{many}:5:3: 4 items (one, n0, n1, ...): tams would refuse it: generate.width: 500" in run.stderr


def test_provider_options_reach_only_that_providers_items(tmp_path: Path) -> None:
    from flows.pipeline import plan_items

    text = GOOD.replace("  height: 512\n", "  height: 512\n  options: {steps_hint: 1}\n"
                        "  provider_options:\n    tencent: {LogoAdd: 0}\n") + "  - id: two\n    prompt: a dog\n    provider: tencent\n"
    spec = load_spec(write(tmp_path, text))
    tams, tencent = plan_items(spec, "sha", date(2026, 1, 2), str(tmp_path))
    assert tams.request.options == {"steps_hint": 1}
    assert tencent.request.options == {"steps_hint": 1, "LogoAdd": 0}
    bad = issue_of(tmp_path, text.replace("    tencent: {LogoAdd: 0}", "    tencnet: {LogoAdd: 0}"))
    assert bad[0].field.startswith("generate.provider_options")


def test_items_override_generate_settings(tmp_path: Path) -> None:
    """An item's own `generate` replaces the spec's fields it names and adds to its options
    (item over spec, provider-specific over general); the others inherit. Its request (and so
    its request id) is its own."""
    from flows.pipeline import plan_items

    text = GOOD.replace("  height: 512\n", "  height: 512\n  steps: 20\n  options: {a: 1, b: 1}\n"
                        "  provider_options:\n    tencent: {LogoAdd: 0, b: 2}\n") + (
        "  - id: two\n    prompt: a cat\n    provider: tencent\n"
        "    generate: {width: 768, height: 768, options: {a: 3}, provider_options: {tencent: {LogoAdd: 1}}}\n")
    spec = load_spec(write(tmp_path, text))
    one, two = plan_items(spec, "sha", date(2026, 1, 2), str(tmp_path))
    assert (one.request.width, one.request.steps, one.request.options) == (512, 20, {"a": 1, "b": 1})
    assert (two.request.width, two.request.height, two.request.steps) == (768, 768, 20)
    assert two.request.options == {"a": 3, "b": 2, "LogoAdd": 1}
    same = load_spec(write(tmp_path, text.replace("width: 768, height: 768, ", "")))
    assert plan_items(same, "sha", date(2026, 1, 2), "")[1].request.request_id != two.request.request_id


def test_an_items_own_setting_is_checked_at_its_line(tmp_path: Path) -> None:
    """Each item is validated against its own provider's rules with its own settings; the
    error points at the item's setting, and an item's option may not override a checked field."""
    bad = write(tmp_path, GOOD + "  - id: two\n    prompt: a dog\n    generate:\n      width: 500\n")
    run = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "items[1] (two): tams would refuse it: generate.width: 500 is not a multiple of 64" in run.stderr
    assert f"{bad}:15:7:" in run.stderr and "items[0]" not in run.stderr
    sneaky = write(tmp_path, GOOD.replace("    prompt: a cat\n", "    prompt: a cat\n    generate: {options: {steps: 99}}\n"))
    run = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(sneaky)], capture_output=True, text=True)
    assert run.returncode == 1 and f"{sneaky}:12:26:" in run.stderr
    assert "items[0].generate.options.steps" in run.stderr and "options may not override it" in run.stderr


def test_run_overrides_are_typed_with_a_spec_escape_hatch() -> None:
    """The Run form's `overrides`: typed fields a person changes, a plain dict of spec fields
    (as before) still accepted as the escape hatch, and unknown typed fields refused."""
    from pydantic import ValidationError

    from flows.specs.spec import RunOverrides

    typed = RunOverrides.model_validate({"max_credits": {"tams": 40}, "max_parallel": 2, "items": ["a"],
                                         "spec": {"run": {"poll_interval": 0.5}}})
    assert typed.spec_overrides() == {"run": {"poll_interval": 0.5, "max_credits": {"tams": 40}, "max_parallel": 2}}
    legacy = RunOverrides.model_validate({"run": {"max_credits": 50}})
    assert legacy.spec == {"run": {"max_credits": 50}} and legacy.spec_overrides() == {"run": {"max_credits": 50}}
    assert RunOverrides.model_validate({}).spec_overrides() == {}
    with pytest.raises(ValidationError):
        RunOverrides.model_validate({"max_parallel": 0})


@pytest.mark.parametrize("overrides, said", [
    ({"run": {"max_paralel": 3}}, "run.max_paralel: unknown key (did you mean max_parallel?)"),
    ({"reviw": {"min_stddev": 2}}, "reviw: unknown key (did you mean review?)"),
    ({"run": {"max_parallel": 0}}, "run.max_parallel: Input should be greater than or equal to 1"),
])
def test_a_mistake_in_a_run_s_overrides_is_told_as_the_overrides(overrides: dict, said: str) -> None:
    """It was told at demo.yaml:1:1, a line that has no such thing."""
    with pytest.raises(SpecError) as refused:
        load_spec(ROOT / "pipelines" / "demo.yaml", overrides)
    shown = "pipelines/demo.yaml" if Path.cwd().resolve() == ROOT.resolve() else ROOT / "pipelines" / "demo.yaml"
    assert str(refused.value) == f"{shown}, in this run's overrides: {said}"


@pytest.mark.parametrize("name", ["demo.yaml", "catalogue-demo.yaml"])
def test_a_loaded_spec_is_the_parsed_one_packed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_spec` hands back a copy of what parsing made (so the parse's leftovers can give their
    memory back; from `PACK_FROM` items, here from one): equal in every field, and plans made
    from it the same."""
    from flows.pipeline import plan_items
    from flows.specs import spec as spec_module
    from flows.specs.spec import parse_spec

    monkeypatch.setattr(spec_module, "PACK_FROM", 1)

    path = Path(__file__).parent.parent / "pipelines" / name
    loaded = load_spec(path)
    parsed = parse_spec(path.read_text(), name=str(path), base_dir=path.resolve().parent)
    assert loaded == parsed and loaded is not parsed
    assert plan_items(loaded, "sha", date(2026, 7, 1), "/tmp/w", str(path)) \
        == plan_items(parsed, "sha", date(2026, 7, 1), "/tmp/w", str(path))


def test_a_large_spec_keeps_little_of_its_parse(tmp_path: Path) -> None:
    """5,000 items: what the process keeps after `load_spec` is about the spec's own objects, not
    the arenas its parse went through (28 MB of them before `packed`). Measured in a process of
    its own, as the growth of CPython's small-object arenas."""
    items = "".join(f"- id: item-{n:04d}\n  prompt: product shot {n}, studio light\n  seed: {n}\n" for n in range(5000))
    spec = tmp_path / "large.yaml"
    spec.write_text(GOOD.split("items:")[0] + "items:\n" + items)
    script = ("import sys, gc, os\nfrom pathlib import Path\nfrom flows.specs.spec import load_spec\n"
              "def arenas():\n"
              "    r, w = os.pipe(); saved = os.dup(2); os.dup2(w, 2); sys._debugmallocstats(); os.dup2(saved, 2)\n"
              "    os.close(w); out = b''\n"
              "    while (chunk := os.read(r, 65536)): out += chunk\n"
              "    os.close(r)\n"
              "    return next(int(line.split('=')[1].replace(',', '')) for line in out.decode().splitlines()\n"
              "                if 'arenas allocated current' in line)\n"
              "load_spec(Path(sys.argv[1]).parent / 'warm.yaml'); gc.collect(); before = arenas()\n"
              "spec = load_spec(Path(sys.argv[1])); assert len(spec.items) == 5000, len(spec.items)\n"
              "print(arenas() - before)\n")
    (tmp_path / "warm.yaml").write_text(GOOD)
    done = subprocess.run([sys.executable, "-c", script, str(spec)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) <= 12  # 1 MiB arenas: 5 here, 25 without packing


def test_a_spec_named_as_messages_name_it_is_found_from_any_folder(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages name a spec of pipelines/ as `pipelines/NAME.yaml` (a deployment's run, whose
    checkout is gone when read): the command they suggest works outside the project's folder too,
    and in it names the spec the same way."""
    from flows.specs.spec import PIPELINES_DIR, resolve_spec_path, shown

    monkeypatch.chdir(tmp_path)
    assert resolve_spec_path("pipelines/demo.yaml") == PIPELINES_DIR / "demo.yaml"
    assert shown(PIPELINES_DIR / "demo.yaml") == str(PIPELINES_DIR / "demo.yaml")  # elsewhere: the whole path
    monkeypatch.chdir(PIPELINES_DIR.parent)
    assert shown(PIPELINES_DIR / "demo.yaml") == "pipelines/demo.yaml"
