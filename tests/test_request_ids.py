"""The request id hashes exactly what the provider is paid for: spec edits that do not change
what a provider is paid for never change it (so they never re-pay archived items), and edits
that do always do."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

from flows.pipeline import plan_items
from flows.specs.spec import load_spec

ASSET = Path(__file__).parent.parent / "pipelines" / "assets" / "sneaker-sketch.png"
DAY = date(2026, 3, 1)


def ids(tmp_path: Path, text: str, name: str = "spec.yaml") -> dict[str, str]:
    path = tmp_path / name
    path.write_text(text)
    return {p.item_id: p.request.request_id for p in plan_items(load_spec(path), "", DAY, "")}


def spec(items: str, generate: str = "{width: 512, height: 512, steps: 20, sampler: 'Euler a'}",
         upscale: str = "") -> str:
    return f"""\
version: 1
name: ids
provider: tams
blocks: {{tams: sandbox, tencent: sandbox}}
generate: {generate}
{upscale}archive: {{bucket: imagegen-test}}
items:
{items}"""


def test_another_providers_options_do_not_change_an_items_request(tmp_path) -> None:
    items = "  - {id: a, prompt: a cat}\n  - {id: b, prompt: a dog, provider: tencent}\n"
    gen = "{{width: 1024, height: 1024, steps: 20, sampler: 'Euler a', provider_options: {{tencent: {{LogoAdd: {}}}}}}}"
    first, second = ids(tmp_path, spec(items, gen.format(0))), ids(tmp_path, spec(items, gen.format(1)))
    assert first["a"] == second["a"]  # TAMS is paid for the same thing
    assert first["b"] != second["b"]  # Tencent is not


def test_a_local_upscale_engine_change_never_re_pays_generation(tmp_path) -> None:
    items = "  - {id: a, prompt: a cat}\n"
    lanczos = ids(tmp_path, spec(items, upscale="upscale: {engine: lanczos, factor: 2}\n"))
    esrgan = ids(tmp_path, spec(items, upscale="upscale: {engine: realesrgan, factor: 2}\n"))
    none = ids(tmp_path, spec(items))
    assert lanczos == esrgan == none
    inside = ids(tmp_path, spec(items, upscale="upscale: {engine: provider, factor: 2}\n"))
    assert inside["a"] != none["a"]  # TAMS upscales inside the paid job: a different job


def test_inserting_an_item_above_one_without_id_renames_and_re_pays_nothing(tmp_path) -> None:
    before = ids(tmp_path, spec("  - {prompt: a cat}\n  - {prompt: a dog}\n"))
    after = ids(tmp_path, spec("  - {prompt: a bird}\n  - {prompt: a cat}\n  - {prompt: a dog}\n"))
    assert set(before.items()) <= set(after.items()) and len(after) == 3


def test_the_input_image_enters_by_content_not_by_path(tmp_path) -> None:
    items = "  - {id: a, prompt: a shoe, input_image: sketch.png}\n"
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        shutil.copy(ASSET, folder / "sketch.png")
    assert ids(one, spec(items)) == ids(two, spec(items))  # the checkout moved
    (two / "sketch.png").write_bytes(ASSET.read_bytes() + b"\0")  # another image
    assert ids(one, spec(items)) != ids(two, spec(items))


def test_what_the_provider_is_paid_for_changes_the_id(tmp_path) -> None:
    base = ids(tmp_path, spec("  - {id: a, prompt: a cat}\n"))
    assert base != ids(tmp_path, spec("  - {id: a, prompt: a cat, seed: 4}\n"))
    assert base != ids(tmp_path, spec("  - {id: a, prompt: a black cat}\n"))
    assert base != ids(tmp_path, spec("  - {id: a, prompt: a cat}\n",
                                      "{width: 512, height: 512, steps: 30, sampler: 'Euler a'}"))


def test_two_items_asking_for_the_same_thing_need_ids(tmp_path) -> None:
    import pytest

    from flows.specs.spec import SpecError

    path = tmp_path / "twins.yaml"
    path.write_text(spec("  - {prompt: a cat}\n  - {prompt: a cat}\n"))
    with pytest.raises(SpecError, match="asks for exactly what items\\[0\\] asks for"):
        load_spec(path)


def test_an_id_comes_from_the_item_never_from_the_clock(tmp_path, monkeypatch) -> None:
    """docs/providers/tams.md "Jobs": `requestId` must be unique to be idempotent, and the FAQ's
    recipe, md5_hex(str(unix_seconds)), gives every job of one second the same id. Ours hash the
    item: fifty items planned within one second get fifty ids, and planning them again at
    another time gives the same fifty."""
    import hashlib
    import time

    items = "".join(f"  - {{id: n{i}, prompt: item {i}}}\n" for i in range(50))
    monkeypatch.setattr(time, "time", lambda: 1700000000.0)
    first = ids(tmp_path, spec(items))
    faq = {item: hashlib.md5(str(int(time.time())).encode()).hexdigest() for item in first}
    assert len(set(faq.values())) == 1 and len(set(first.values())) == 50
    monkeypatch.setattr(time, "time", lambda: 1800000000.0)
    assert ids(tmp_path, spec(items)) == first


def test_the_emulator_takes_a_repeated_id_for_the_same_job(sandbox, tmp_path) -> None:
    """The TAMS emulator's own reading of "ensure request idempotence": a repeated `requestId`
    returns the first job. So two items under the FAQ's per-second id would be one job (the
    second item lost, or given the first one's images); under ours they are two."""
    import hashlib

    from blocks.tams import TamsProvider
    from tests.conftest import tams_stats

    provider = TamsProvider(app_id=sandbox.account("tams")["app_id"], private_key=sandbox.secret("tams", "private_key"),
                            endpoint=sandbox.url("tams"))
    path = tmp_path / "witness.yaml"
    text = spec("  - {id: a, prompt: a cat}\n  - {id: b, prompt: a dog}\n")
    path.write_text(text.replace("name: ids", "name: ids-witness"))
    cat, dog = (plan.request for plan in plan_items(load_spec(path), "", DAY, ""))
    before = tams_stats(sandbox)["submits"]
    assert provider.submit(cat) != provider.submit(dog)
    assert provider.submit(cat) == provider.submit(cat)  # a retry finds its job
    faq_id = hashlib.md5(b"1700000000").hexdigest()
    shared = [provider.submit(r.model_copy(update={"request_id": faq_id})) for r in (cat, dog)]
    assert shared[0] == shared[1]  # the dog was never drawn
    assert tams_stats(sandbox)["submits"] - before == 3
