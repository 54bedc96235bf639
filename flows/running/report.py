"""What a run leaves behind: the run manifest in S3, a table artifact, a printed summary."""

from __future__ import annotations

import gc
import html
import itertools
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import date, datetime, timezone
from typing import Any

from flows.imaging.review import CELL_PX, THUMB_PX, one_line
from flows.storage import archive_bucket, list_objects, presigned_url, read_json, write_json
from flows.specs.spec import PipelineSpec
from flows.models import ArchivedItem, ItemPlan
from flows.running.progress import credits_text


class PipelineIncomplete(RuntimeError):
    """Some items did not archive; `manifest` says which, at which step and why."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        failed = [i["item"] for i in manifest["items"] if i.get("error")]
        super().__init__(f"{len(failed)} of {len(manifest['items'])} item(s) did not archive: {', '.join(failed)}")


def artifact_key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


Charge = tuple[float | None, str]
"""What an item that did not archive cost anyway (None: may have been charged), and why."""


def build_manifest(spec: PipelineSpec, spec_file: str, spec_sha256: str, run_date: date,
                   plans: Iterable[ItemPlan], outcomes: Iterable[tuple[Any, dict[str, str] | None]],
                   started: datetime, reused: frozenset[str] = frozenset(),
                   charges: Callable[[ItemPlan, dict[str, str] | None], Charge | None] | None = None
                   ) -> dict[str, Any]:
    """The run manifest: one entry per item, totals, and `complete` or `partial`. `outcomes` is
    read one item at a time, in step with `plans`, so it may make each as it is asked for.
    `charges` says what an item that did not archive cost anyway, asked once its outcome is read."""
    from prefect.runtime import flow_run

    items = []
    for plan, (result, error) in zip(plans, outcomes, strict=True):
        entry: dict[str, Any] = {"item": plan.item_id, "provider": plan.provider,
                                 "request_id": plan.request.request_id, "seed": plan.request.seed}
        if isinstance(result, ArchivedItem):
            entry.update(job_id=result.job_id, credits=result.credits, credits_source=result.credits_source,
                         objects=[_shared_keys(o) for o in result.objects], reused=plan.item_id in reused)
        else:
            cost, note = (charges(plan, error) if charges else None) or (0.0, None)
            entry.update(credits=cost or 0.0, objects=[], error=error)
            if note:
                entry.update(charge=note, credits_unknown=cost is None)
        items.append(entry)
    objects = [o for i in items for o in i["objects"]]
    return {
        "pipeline": spec.name, "spec_file": spec_file, "spec_sha256": spec_sha256,
        "run_date": run_date.isoformat(), "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "started_at": started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
        "status": "complete" if all("error" not in i for i in items) else "partial",
        "totals": {
            "items": len(items), "failed_items": sum("error" in i for i in items),
            "images": len(objects), "approved": sum(o["verdict"] == "approved" for o in objects),
            "rejected": sum(o["verdict"] == "rejected" for o in objects),
            "credits": round(sum(i["credits"] for i in items), 4),
            "credits_by_provider": _by_provider(items),
            "credits_this_run": round(sum(i["credits"] for i in items if not i.get("reused")), 4),
            "reused_items": sum(bool(i.get("reused")) for i in items),
            "items_maybe_charged": sum(bool(i.get("credits_unknown")) for i in items),
        },
        "items": items,
    }


def _by_provider(items: list[dict[str, Any]]) -> dict[str, float]:
    """Each provider's credits in its own unit: TAMS credits, 触站AI points and Tencent calls do
    not add up, so `totals.credits` means something only where one provider ran."""
    out: dict[str, float] = {}
    for item in items:
        provider = str(item.get("provider") or "?")
        out[provider] = out.get(provider, 0.0) + float(item.get("credits") or 0.0)
    return {p: round(c, 4) for p, c in sorted(out.items())}


def _shared_keys(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its keys and verdict one string each for the whole manifest: read back from an
    outcome's pickle, each item had its own copy of them (about 600 bytes an archived item)."""
    return {sys.intern(k): sys.intern(v) if k == "verdict" and isinstance(v, str) else v for k, v in obj.items()}


def with_spend(manifest: dict[str, Any], spend: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """The manifest with the run's own spend (per provider: cap, charged, reserved = maybe
    charged), and `totals.credits_this_run` from it: what this run's paid calls cost or may have
    cost, whether or not their items archived, and nothing another run paid for (without it,
    the credits of the items this run archived, which counts a job an earlier run paid for and
    this one collected, and misses one paid for that did not archive)."""
    manifest["spend"] = spend
    manifest["totals"]["credits_this_run"] = round(sum((s["charged"] or 0.0) + (s["reserved"] or 0.0)
                                                       for s in spend.values()), 4)
    return manifest


def credits_of(manifest: dict[str, Any]) -> str:
    """The credits of a manifest's items as a person reads them (`credits_text`): one number
    where one provider is listed, each provider's in its own unit where several are; with what
    this run paid of them where that differs (a rerun's items were paid by an earlier run)."""
    per_provider = _by_provider(manifest.get("items", []))
    totals = manifest.get("totals") or {}
    this_run = totals.get("credits_this_run")
    if len(per_provider) == 1 and this_run is not None and round(this_run, 4) != round(totals.get("credits") or 0.0, 4):
        return f"{credits_text(per_provider)} ({this_run:g} this run)"
    return credits_text(per_provider)


NO_CELL = "\u2014"
"""A cell with nothing to say (a failed item's index and S3 URI): an em dash, since the UI's
table renders its cells as Markdown and shows a lone `-` as a list bullet."""

SAME_JOB = "(same job)"
"""The `job_credits` of an item's later images: one job made them all, and its credits are on
its first image's row (repeated, a column's sum read as twice what was paid)."""


def summary_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per image (or per failed item): the table shown in the UI and the terminal. A
    failed item's error has a column of its own (only where an item failed), before the long
    `s3_uri`, so a 1400-pixel-wide UI shows it; its `s3_uri` is `NO_CELL`; a job's credits are on
    its first image's row."""
    rows = []
    for item in manifest["items"]:
        for n, obj in enumerate(item["objects"]):
            verdict = obj["verdict"] + (f" ({'; '.join(obj['reasons'])})" if obj.get("reasons") else "")
            rows.append({"item": item["item"], "index": obj["index"], "provider": item["provider"],
                         "job_credits": SAME_JOB if n else item["credits"], "verdict": verdict, "error": "",
                         "s3_uri": obj["s3_uri"] or "dropped"})
        if item.get("error"):
            err = item["error"]
            verdict = ("rejected by the provider" if err["error"] in PROVIDER_REJECTIONS
                       else f"failed at {err['step']}: {err['error']}")
            rows.append({"item": item["item"], "index": NO_CELL, "provider": item["provider"],
                         "job_credits": item.get("credits") or 0.0, "verdict": verdict,
                         "error": err["message"][:200], "s3_uri": NO_CELL})
    if not any(row["error"] for row in rows):  # a run with no failed item shows no empty column
        for row in rows:
            del row["error"]
    return rows


PROVIDER_REJECTIONS = frozenset({"ContentRejected", "ReviewFailed", "AuditFailed"})
"""Error names (ours, `blocks.errors.ContentRejected` and its kinds) that mean the provider
refused the content: shown as a rejection, not as a failure of ours."""


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a terminal table; an empty cell (None) shows as `-`, not as Python's `None`."""
    if not rows:
        return "(no images)"
    columns = list(rows[0])
    cells = [{c: "-" if r[c] is None else str(r[c]) for c in columns} for r in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in cells]
    return "\n".join(lines)


def archived_hashes(spec: PipelineSpec, run_date: date) -> dict[str, str]:
    """Perceptual hashes of the approved images of the pipeline's other run dates."""
    bucket = archive_bucket(spec.archive.bucket, spec.archive.credentials)
    template = spec.archive.manifest_template
    prefix = template.split("{run_date", 1)[0].format(pipeline=spec.name) if "{run_date" in template else ""
    mine = spec.archive.phashes_key(spec.name, run_date)
    out: dict[str, str] = {}
    for obj in list_objects(bucket, prefix):
        if obj["Key"].endswith("/phashes.json") and obj["Key"] != mine:
            date_dir = obj["Key"].rsplit("/", 1)[0]
            out.update({f"{date_dir}:{k}": v for k, v in (read_json(bucket, obj["Key"]) or {}).items()})
    return out


GALLERY_COLUMNS = 4  # 4 cells of 200 px fit the artifact's column beside the UI's side panel at 1400 px


def html_grid(cells: list[str], columns: int = GALLERY_COLUMNS) -> str:
    """An HTML table `columns` cells wide, each cell as wide as a thumbnail; one row a line, with
    no blank line, so that markdown takes the table as one block of HTML."""
    rows = ["<tr>" + "".join(f'<td valign="top" width="{CELL_PX}">{cell}</td>' for cell in cells[i:i + columns])
            + "</tr>" for i in range(0, len(cells), columns)]
    return "\n".join(["<table>", *rows, "</table>"])


def gallery_cells(manifest: dict[str, Any], url_of: Callable[[str], str]) -> Iterator[str]:
    """One HTML cell per image (and per failed item), made as it is asked for: the image shown
    `THUMB_PX` wide (never cropped) as a link to itself, its id, verdict and checks, and a "full
    size" link. `url_of` turns an `s3://` URI into a link a browser can load."""
    for item in manifest["items"]:
        for obj in item["objects"]:
            label = one_line(f"{item['item']} #{obj['index']}")
            text = (f"<b>{label}</b> {one_line(obj['verdict'])}<br>"
                    f"{one_line('; '.join(obj.get('reasons') or []) or 'all checks passed')}")
            if not obj["s3_uri"]:
                yield f"{text}<br>(dropped: not archived)"
                continue
            url = html.escape(url_of(obj["s3_uri"]))
            yield (f'<a href="{url}"><img src="{url}" width="{THUMB_PX}" loading="lazy" alt="{label}"></a>'
                   f'<br>{text}<br><a href="{url}">full size</a>')
        if item.get("error"):
            error = item["error"]
            yield (f"<b>{one_line(item['item'])}</b> {one_line(error['error'])}<br>"
                   f"{one_line(error['message'][:160])}")


GALLERY_PAGE_BYTES = 600_000
"""The most markdown one gallery artifact holds (about 400 images with the sandbox's links); a
run with more has more pages. One document of every image was 6.8 MB at 5,000 images, held
about three times over while sent, and larger than the Prefect server publishes as an event
(1.5 MB, `PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES`)."""


def gallery_pages(title: str, manifest: dict[str, Any], url_of: Callable[[str], str],
                  page_bytes: int = GALLERY_PAGE_BYTES) -> Iterator[str]:
    """The gallery, at most `page_bytes` of cells a page (at least one cell), each page made
    when asked for: a heading, a count (and, past one page, which cells), and a grid of
    `gallery_cells`."""
    shown = sum(1 for i in manifest["items"] for o in i["objects"] if o["s3_uri"])
    total = sum(len(i["objects"]) + bool(i.get("error")) for i in manifest["items"])
    cells, first, chunk, size = gallery_cells(manifest, url_of), 1, [], 0
    for cell in itertools.chain(cells, [None]):
        if chunk and (cell is None or size + len(cell) > page_bytes):
            last = first + len(chunk) - 1
            where = "" if first == 1 and cell is None else (
                f" Cells {first}-{last} of {total}" + ("; the other pages are on this run's Artifacts tab."
                                                       if first == 1 else "."))
            yield f"### {title}\n\n{shown} image(s); click one for full size.{where}\n\n{html_grid(chunk)}\n"
            first, chunk, size = last + 1, [], 0
        if cell is not None:
            chunk.append(cell)
            size += len(cell)
    if total == 0:
        yield f"### {title}\n\n0 image(s); click one for full size.\n\n(no images)\n"


def gallery_markdown(title: str, manifest: dict[str, Any], url_of: Callable[[str], str]) -> str:
    """The gallery's first page (all of it, up to `GALLERY_PAGE_BYTES` of cells)."""
    return next(gallery_pages(title, manifest, url_of))


def gallery(spec: PipelineSpec, run_date: date, manifest: dict[str, Any], bucket: Any) -> None:
    """Markdown artifacts with every archived image (approved and quarantined) and its verdict,
    a grid of thumbnails from presigned S3 URLs (valid 7 days): the first page under the key
    `<pipeline>-gallery`, the others on the run's Artifacts tab, each made and sent in turn."""
    from prefect.artifacts import create_markdown_artifact

    def url_of(uri: str) -> str:
        return presigned_url(bucket, uri.removeprefix(f"s3://{bucket.bucket_name}/"))

    for page, markdown in enumerate(gallery_pages(f"{spec.name} {run_date}", manifest, url_of), start=1):
        create_markdown_artifact(markdown, key=artifact_key(f"{spec.name}-gallery") if page == 1 else None,
                                 description=f"Images of {spec.name} {run_date} with their verdicts"
                                             + (f", page {page}" if page > 1 else ""))
        let_go_of_sent()


def let_go_of_sent() -> None:
    """Free what a large send left: the Prefect client's request and answer of an artifact (each
    as large as the document) are held in reference cycles, which only Python's cycle collector
    frees; left to it, five gallery pages of 600 KB were still held as the sixth was sent
    (`benchmarks/endpeak.py`). A collection of the young generations finds them at once."""
    gc.collect(1)


def publish(spec: PipelineSpec, run_date: date, manifest: dict[str, Any],
            done: Callable[[str], None] = lambda step: None) -> str:
    """Write the manifest to S3, create the summary table artifact, log the table. A run whose
    claim is lost writes nothing (`ClaimLost`): the run that may hold the claim now writes its own.
    `done` is told each step's name as it ends (`benchmarks.endpeak` reads memory there)."""
    from prefect import get_run_logger
    from prefect.artifacts import create_table_artifact
    from prefect.runtime import flow_run

    from flows.paying.paidcalls import ClaimLost, claim_lost

    if (why := claim_lost(flow_run.id)) is not None:
        raise ClaimLost(f"the manifest of {spec.name} {run_date} is not written by this run: its claim is lost ({why})")
    bucket = archive_bucket(spec.archive.bucket, spec.archive.credentials)
    uri = write_json(bucket, spec.archive.manifest_key(spec.name, run_date), manifest)
    manifest["manifest_uri"] = uri
    let_go_of_sent()
    done("manifest written")
    hashes = {f"{i['item']}#{o['index']}": o["phash"] for i in manifest["items"] for o in i["objects"]
              if o.get("phash") and o["verdict"] == "approved"}
    if hashes:
        write_json(bucket, spec.archive.phashes_key(spec.name, run_date), hashes)
    del hashes
    done("hashes written")
    gallery(spec, run_date, manifest, bucket)
    done("gallery pages sent")
    rows = summary_rows(manifest)
    totals = manifest["totals"]
    create_table_artifact(
        rows, key=artifact_key(f"{spec.name}-summary"),
        description=(f"**{spec.name}** {run_date}: {manifest['status']}, {totals['images']} image(s), "
                     f"{totals['approved']} approved, {totals['rejected']} rejected, "
                     f"{totals['failed_items']} failed item(s), {credits_of(manifest)}. Manifest: `{uri}`"),
    )
    del rows
    let_go_of_sent()
    done("summary table sent")
    get_run_logger().info("manifest %s: %s", uri, totals)
    return uri
