"""Prefect Blocks: one module per image provider behind `blocks.base.ImageProvider`, and the
S3 archive's credentials (`blocks.awscredentials`, a saved prefect-aws Block read without
prefect-aws). Importing this package registers this project's Block classes, so
`Block.load("tams-provider/<name>")` works; `PROVIDERS` holds every registered provider
(`blocks.registry`), this project's and those other packages declare."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

from prefect.blocks.core import Block

from blocks import registry
from blocks.base import ImageProvider
from blocks.chuzhan import ChuzhanProvider
from blocks.tams import TamsProvider
from blocks.errors import BlockMissing
from blocks.tencent import TencentAiArtProvider

B = TypeVar("B", bound=Block)


class _Providers(Mapping[str, type[ImageProvider]]):
    """The registry, read when first used (so a provider installed later in the process counts)."""

    def __getitem__(self, name: str) -> type[ImageProvider]:
        return registry.provider(name)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.providers())

    def __len__(self) -> int:
        return len(registry.providers())


PROVIDERS: Mapping[str, type[ImageProvider]] = _Providers()


def load_block(cls: type[B], name: str) -> B:
    """Load the saved Block `name` of type `cls`; `BlockMissing` (one line naming it and how to
    save it) when the Prefect server has none of that name."""
    try:
        return cls.load(name)
    except ValueError as exc:
        if "Unable to find block document" not in str(exc):
            raise
        from prefect.settings import PREFECT_API_URL

        raise BlockMissing(cls.get_block_type_slug(), name, PREFECT_API_URL.value()) from None


def load_provider(name: str, block_name: str) -> ImageProvider:
    """Load the saved Block `block_name` of provider `name`."""
    return load_block(registry.provider(name), block_name)


__all__ = ["PROVIDERS", "BlockMissing", "ChuzhanProvider", "ImageProvider", "TamsProvider", "TencentAiArtProvider",
           "load_block", "load_provider"]
