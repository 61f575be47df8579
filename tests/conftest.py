"""Shared fixtures: a tiny random SD pipeline built from configs, and its edgesd export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _cache_folder(tmp_path_factory):
    """The runtime's default cache (on) goes to a folder of this test run, not the user's."""
    os.environ["EDGESD_CACHE_DIR"] = str(tmp_path_factory.mktemp("edgesd-cache"))
    yield
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    from edgesd.export.tiny import build_random_sd

    return build_random_sd(tmp_path_factory.mktemp("src") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_src, tmp_path_factory) -> Path:
    from edgesd.export import export_model

    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    report = export_model(tiny_src, out)
    assert report.passed
    return out
