"""torchtitan_ext refuses an older torch with an ImportError that names the torch it needs."""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip(
    "torchtitan", reason="torchtitan_ext is the torchtitan extra: pip install -e .[torchtitan]"
)


@pytest.mark.parametrize("version", ["2.11.0+cu128", "2.12.1", "1.13.0", "garbage"])
def test_old_torch_is_refused_with_the_required_version(version):
    import torchtitan_ext

    with pytest.raises(ImportError) as info:
        torchtitan_ext.check_torch_version(version)
    msg = str(info.value)
    assert "torch>=2.13" in msg and f"torch {version} is installed" in msg and "pip install torch==" in msg


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0+cpu", "2.14.0.dev20260101", "3.0.0"])
def test_supported_torch_is_accepted(version):
    import torchtitan_ext

    torchtitan_ext.check_torch_version(version)


def test_import_fails_on_old_torch(monkeypatch):
    """The check runs at import time, on the installed ``torch.__version__``."""
    import torchtitan_ext

    monkeypatch.setattr(torch, "__version__", "2.11.0+cu128")
    saved = sys.modules["torchtitan_ext"]
    try:
        with pytest.raises(ImportError, match=r"needs torch>=2\.13 .* torch 2\.11\.0\+cu128 is installed"):
            importlib.reload(torchtitan_ext)
    finally:
        sys.modules["torchtitan_ext"] = saved
        monkeypatch.undo()
        importlib.reload(saved)


def test_torchtitan_extra_pins_the_same_torch():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    import torchtitan_ext

    need = ".".join(map(str, torchtitan_ext.REQUIRED_TORCH))
    assert f"torch>={need}" in extra["torchtitan"]
    assert "torch>=2.11" in core  # pcopt itself keeps working on torch 2.11
