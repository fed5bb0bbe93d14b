"""Skipping a framework's tests when its extra is not installed, with the reason."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

EXTRAS = {"torch": "pytorch", "tensorflow": "tensorflow"}


def requires(package: str) -> pytest.MarkDecorator:
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(
        missing, reason=f"{package} is not installed: pip install 'opserve[{EXTRAS[package]}]'"
    )


def place(source: Path, target: Path) -> Path:
    """Copy a model file or folder into a repository."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return target
