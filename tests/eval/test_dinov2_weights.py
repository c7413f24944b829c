"""Which DINOv2 weights FD-DINOv2 ran with: Meta's file is recognised by its SHA-256, any other file loads
with a named warning and the report says its numbers are not comparable to published ones; files that are
not DINOv2 weights, or need code to load, are refused with what was wrong."""

from __future__ import annotations

import datetime
import hashlib
import re
import warnings
from pathlib import Path

import pytest
import torch

from ldmkit.eval.features import dinov2
from ldmkit.eval.features.dinov2 import (DINOV2_BYTES, DINOV2_FILENAME, DINOV2_SHA256, DINOv2FeatureExtractor,
                                         UnofficialDINOv2WeightsWarning, hub_dinov2_weights_path)
from ldmkit.eval.metrics.feature_reference import describe
from ldmkit.nn.weights_file import UntrustedWeightsError, WeightsFileError
from tests.eval.test_dinov2_features import hf_folder, official_checkpoint  # noqa: F401 (fixture)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_official_digest_is_a_sha256():
    assert re.fullmatch(r"[0-9a-f]{64}", DINOV2_SHA256) and DINOV2_BYTES == 1_217_586_395


def test_another_file_warns_and_the_report_says_not_comparable(tmp_path):
    path = tmp_path / DINOV2_FILENAME  # the official name, other bytes
    official_checkpoint(path)
    with pytest.warns(UnofficialDINOv2WeightsWarning, match=r"NOT comparable to published numbers") as record:
        extractor = DINOv2FeatureExtractor(path)
    assert sha256(path)[:16] in str(record[0].message) and DINOV2_SHA256[:16] in str(record[0].message)
    assert extractor.official is False and extractor.sha256 == sha256(path)
    line = describe(extractor)
    assert f"NOT the official {DINOV2_FILENAME} (SHA-256 {sha256(path)[:16]}" in line and "224x224" in line


def test_the_official_file_is_recognised_by_its_digest(tmp_path, monkeypatch):
    path = tmp_path / "renamed.pth"
    official_checkpoint(path)
    monkeypatch.setattr(dinov2, "DINOV2_SHA256", sha256(path))  # stand-in for Meta's 1.2 GB file
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnofficialDINOv2WeightsWarning)
        extractor = DINOv2FeatureExtractor(path)
    assert extractor.official is True
    assert f"the official {DINOV2_FILENAME} (SHA-256 {sha256(path)[:16]}... verified)" in describe(extractor)


def test_a_hub_snapshot_is_recorded_as_unchecked(hf_folder):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnofficialDINOv2WeightsWarning)
        extractor = DINOv2FeatureExtractor(hf_folder)
    assert extractor.official is None and extractor.sha256 == sha256(hf_folder / "model.safetensors")
    assert "snapshot folder" in describe(extractor) and "no published digest" in describe(extractor)


@pytest.mark.skipif(not hub_dinov2_weights_path().is_file(), reason="Meta's dinov2_vitl14_pretrain.pth not cached")
def test_the_cached_official_file_has_the_official_digest():
    path = hub_dinov2_weights_path()
    assert path.stat().st_size == DINOV2_BYTES and sha256(path) == DINOV2_SHA256


def test_files_that_are_not_dinov2_weights_are_refused(tmp_path):
    other = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, other)
    with pytest.raises(WeightsFileError, match=r"'.*inception.pth' is not a DINOv2 checkpoint: it has no "
                                               r"patch_embed.proj.weight.*dinov2_vitl14_pretrain.pth"):
        DINOv2FeatureExtractor(other)
    code = tmp_path / "code.pth"
    torch.save({"pos_embed": torch.zeros(1), "made": datetime.date(2024, 1, 1)}, code)
    with pytest.raises(UntrustedWeightsError, match=r"refused on purpose.*datetime"):
        DINOv2FeatureExtractor(code)
    truncated = tmp_path / "truncated.pth"
    official_checkpoint(truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(WeightsFileError, match=r"cannot be read .*truncated, corrupt"):
        DINOv2FeatureExtractor(truncated)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(WeightsFileError, match=r"holds a list, not a state dict"):
        DINOv2FeatureExtractor(listed)
