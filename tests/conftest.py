"""Shared fixtures: a tiny Llama and seeded LoRA adapters, built locally once per checkout."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from entrypoint.demo import build_adapter, build_base_model

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("LORA_TEST_ASSETS", ROOT / ".cache" / "test-assets"))


@pytest.fixture(autouse=True)
def _clean_nim_env(monkeypatch):
    """Tests see only the NIM_* variables they set themselves."""
    for key in list(os.environ):
        if key.startswith("NIM_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_base_model(ASSETS / "tiny-llama")


@pytest.fixture(scope="session")
def library(tiny_model) -> Path:
    """Adapters to copy from: alpha, beta, gamma (rank 8, seeds 11-13) and big (rank 64)."""
    lib = ASSETS / "library"
    for name, seed in (("alpha", 11), ("beta", 12), ("gamma", 13)):
        build_adapter(tiny_model, lib / name, seed=seed)
    build_adapter(tiny_model, lib / "big", seed=14, rank=64, alpha=64)
    return lib


def copy_adapter(src: Path, dst: Path) -> Path:
    """Copy an adapter folder into place atomically (copy beside, then rename)."""
    tmp = dst.parent / f".{dst.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
