"""Shared test fixtures: where the shared data lives, and a clear skip when it is absent."""

from __future__ import annotations

import pytest

from calibprompt.settings import DATA_ENV, data_dir


def require_shared(relative: str):
    """Path of a shared-data file, or skip naming the missing file and the setting."""
    path = data_dir() / relative
    if not path.exists():
        pytest.skip(f"shared data file {path} is absent; set {DATA_ENV} to the shared/data folder")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own feature cache so tests never see each other's files, and its own record of
    the notes already shown (notes show once per process; a test must not depend on which ran before)."""
    import calibprompt.progress

    monkeypatch.setenv("CALIBPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibprompt.progress, "_seen", set())
