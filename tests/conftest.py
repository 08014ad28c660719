"""Shared fixtures: an isolated cache, a small synthetic GTSRB-layout dataset, and the real dev data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep the decoded-image and synthetic-set caches of the tests out of the user's home."""
    cache = tmp_path_factory.mktemp("resnetlab-cache")
    previous = os.environ.get("RESNETLAB_CACHE_DIR")
    os.environ["RESNETLAB_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("RESNETLAB_CACHE_DIR", None)
    else:
        os.environ["RESNETLAB_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_signs(tmp_path_factory) -> Path:
    """A small synthetic set in the GTSRB Kaggle layout (Train.csv, Test.csv), shared by the tests of a session."""
    from resnetlab.data.synthetic import generate_synthetic_signs

    return generate_synthetic_signs(tmp_path_factory.mktemp("signs") / "tiny", per_class=24, test_per_class=8, seed=3)


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real development data {path} is absent (it lives in ../shared/data beside the repository)")
    return path
