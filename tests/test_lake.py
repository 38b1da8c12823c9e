"""Lake roots: plain folders become file:// URIs; roots Spark and URIs would disagree on fail early."""

from __future__ import annotations

import pytest

from lake_contract.lake import Lake


def test_a_plain_folder_becomes_an_absolute_file_uri(tmp_path):
    assert Lake(str(tmp_path / "lake")).root == f"file://{tmp_path}/lake"
    assert Lake("s3://bucket/lake/").root == "s3://bucket/lake"


@pytest.mark.parametrize("name", ["synthetic-1,000,000", "my lake", "100%"])
def test_a_root_that_needs_uri_encoding_is_refused_with_a_clear_message(tmp_path, name):
    with pytest.raises(ValueError, match="characters that need URI encoding"):
        Lake(str(tmp_path / name))
