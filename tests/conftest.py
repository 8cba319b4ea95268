"""Shared fixtures: a data cache shared across the session and the tiny configuration that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.common import TINY


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer/shard cache for the whole session: every test reuses the first build."""
    return tmp_path_factory.mktemp("greenrun-cache")


@pytest.fixture
def tiny(cache_dir: Path) -> list[str]:
    return [*TINY, f"data.cache_dir={cache_dir}"]
