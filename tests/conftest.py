"""Shared fixtures: a tiny Llama and seeded LoRA adapters, built locally once per checkout."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_demo import build_adapter, build_base_model

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("LORA_TEST_ASSETS", ROOT / ".cache" / "test-assets"))


@pytest.fixture(autouse=True)
def _clean_nim_env(monkeypatch):
    """Tests see only the NIM_* variables they set themselves."""
    for key in list(os.environ):
        if key.startswith("NIM_"):
            monkeypatch.delenv(key)


@contextlib.contextmanager
def assets_lock() -> Iterator[None]:
    """Held while shared test assets are built: the unit tests run in two processes
    (pytest-xdist), and on a fresh clone both would build the same files at once."""
    ASSETS.mkdir(parents=True, exist_ok=True)
    with open(ASSETS / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    with assets_lock():
        return build_base_model(ASSETS / "tiny-llama")


@pytest.fixture(scope="session")
def library(tiny_model) -> Path:
    """Adapters to copy from: alpha, beta, gamma (rank 8, seeds 11-13) and big (rank 64)."""
    lib = ASSETS / "library"
    with assets_lock():
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


# GPU inventories as `nvidia-smi --query-gpu=index,uuid,name,memory.total,compute_cap` would
# print them (no GPU and no NVML here: detection falls back to this).
H100 = "NVIDIA H100 80GB HBM3, 81559, 9.0"
A100 = "NVIDIA A100-SXM4-40GB, 40960, 8.0"
L4 = "NVIDIA L4, 23034, 8.9"
INVENTORIES = {
    "none": [],
    "1xH100": [H100],
    "2xH100": [H100] * 2,
    "8xA100": [A100] * 8,
    "1xL4": [L4],
}


def smi_rows(gpus: list[str]) -> str:
    return "".join(f"{i}, GPU-{i:04d}-fake, {gpu}\n" for i, gpu in enumerate(gpus))


def install_fake_smi(folder: Path, gpus: list[str]) -> Path:
    """A `nvidia-smi` that reports `gpus`, in `folder` (put it first on PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\ncat <<'EOF'\n" + smi_rows(gpus) + "EOF\n")
    script.chmod(0o755)
    return folder


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """Call with an inventory name; PATH then finds a nvidia-smi that reports it."""

    def use(name: str) -> dict[str, str]:
        folder = install_fake_smi(tmp_path / f"smi-{name}", INVENTORIES[name])
        path = f"{folder}:{os.environ['PATH']}"
        monkeypatch.setenv("PATH", path)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        return {"PATH": path}

    return use


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on loopback, for the whole run."""
    from tests.s3store import S3Store

    store = S3Store(tmp_path_factory.mktemp("seaweedfs")).start()
    yield store
    store.stop()


@pytest.fixture
def bucket(s3_store, request) -> str:
    """A fresh bucket of the store, named after the test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    s3_store.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """A real Hub-compatible server (olah) on loopback, for the whole run."""
    from tests.hubserver import HubServer

    server = HubServer(tmp_path_factory.mktemp("hub")).start()
    yield server
    server.stop()
