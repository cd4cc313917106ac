"""paths: the checks of what an export folder holds and how a path option is read, called directly."""

from __future__ import annotations

import pytest

from zone_engine.errors import ZoneError
from zone_engine.paths import expanded, export_kind


def test_export_kind_reads_only_a_manifest_object():
    """A manifest.json that parses to a list or a string naming the key is no export's: a bare `key in
    manifest` would call ["graphs"] a UNet export and "model_type" a SAM one."""
    assert export_kind({"graphs": {}}) == "unet" and export_kind({"model_type": "vit_b"}) == "sam"
    for manifest in (["graphs"], "model_type", {}, None):
        assert export_kind(manifest) is None, manifest


def test_a_nul_in_a_home_folders_user_name_is_said_not_raised():
    """Path.expanduser raises ValueError for a NUL in `~user`: told as the error asked for, not a traceback."""
    with pytest.raises(ZoneError, match="the home folder of .* is not known here"):
        expanded("~no\0user/out.png")
