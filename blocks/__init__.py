"""Prefect Blocks: one module per image provider behind `blocks.base.ImageProvider`, and the
S3 archive on prefect-aws. Importing this package registers every Block class, so
`Block.load("tams-provider/<name>")` works."""

from __future__ import annotations

from blocks.base import ImageProvider
from blocks.chuzhan import ChuzhanProvider
from blocks.tams import TamsProvider
from blocks.tencent import TencentAiArtProvider

PROVIDERS: dict[str, type[ImageProvider]] = {cls.provider_name: cls for cls in (TamsProvider, ChuzhanProvider, TencentAiArtProvider)}


def load_provider(name: str, block_name: str) -> ImageProvider:
    """Load the saved Block `block_name` of provider `name`."""
    try:
        cls = PROVIDERS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(sorted(PROVIDERS))}") from None
    return cls.load(block_name)


__all__ = ["PROVIDERS", "ChuzhanProvider", "ImageProvider", "TamsProvider", "TencentAiArtProvider", "load_provider"]
