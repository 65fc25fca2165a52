"""Shared fixtures: small generated data, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shapes_karpathy(tmp_path_factory) -> Path:
    """The shapes set (60 images) in Karpathy format; returns the caption file."""
    from captioner.data.synthetic import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes_karpathy"), num_images=60, seed=3, format="karpathy")
