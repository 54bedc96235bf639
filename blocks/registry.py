"""The providers this installation knows: every `imagegen.providers` entry point.

A provider is three things: its Block module (a subclass of `blocks.base.ImageProvider`, named
by the entry point), its emulator module (named by the Block's `emulator` attribute, see
`sandbox/serve.py` for what it provides) and its entry in `deployments/limits.yaml`. The spec's
provider names, the CLI, the sandbox launcher and the test fixtures all read this registry. So
a new provider needs no other change: this project declares its three in `pyproject.toml`, and
another package declares its own the same way.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blocks.base import ImageProvider

GROUP = "imagegen.providers"


class UnknownProvider(KeyError, ValueError):
    """A provider name no entry point declares."""

    def __str__(self) -> str:
        return str(self.args[0])


@lru_cache(maxsize=1)
def providers() -> dict[str, type[ImageProvider]]:
    """Provider name -> Block class, in name order (imported once, on first use)."""
    from blocks.base import ImageProvider

    found: dict[str, type[ImageProvider]] = {}
    for point in entry_points(group=GROUP):
        cls = point.load()
        if not (isinstance(cls, type) and issubclass(cls, ImageProvider)):
            raise TypeError(f"entry point {point.name} = {point.value} is not an ImageProvider Block")
        if cls.provider_name != point.name:
            raise TypeError(f"entry point {point.name} names a Block whose provider_name is {cls.provider_name!r}")
        found[point.name] = cls
    return dict(sorted(found.items()))


def names() -> list[str]:
    return list(providers())


@lru_cache(maxsize=1)
def entry_point_names() -> list[str]:
    """The declared provider names, without importing any provider module (for spec checks)."""
    return sorted({point.name for point in entry_points(group=GROUP)})


def provider(name: str) -> type[ImageProvider]:
    try:
        return providers()[name]
    except KeyError:
        raise UnknownProvider(f"unknown provider {name!r}; known: {', '.join(repr(n) for n in names())}") from None


def refresh() -> None:
    """Read the entry points again (after installing a provider package in this process)."""
    providers.cache_clear()
    entry_point_names.cache_clear()
