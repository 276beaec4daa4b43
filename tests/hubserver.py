"""A real Hub-compatible server for the tests: olah (PyPI `olah`, a Hugging Face Hub mirror) on
loopback, offline, serving git repositories the tests make (../shared/reference/hub.md).

olah pins FastAPI and httpx versions of its own, so it lives in a virtual environment of its
own under the test assets, made on first use (`pip install olah`, from PyPI)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ASSETS, assets_lock

VENV = ASSETS / "olah-venv"
OLAH_VERSION = "0.5.4"


def olah_binary() -> Path:
    binary = VENV / "bin" / "olah-cli"
    with assets_lock():
        if not binary.exists():
            shutil.rmtree(VENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet",
                            f"olah=={OLAH_VERSION}"], check=True, timeout=600)
    return binary


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.email=tests@example.com", "-c", "user.name=tests",
                    *args], cwd=cwd, check=True, capture_output=True)


class HubServer:
    """One olah process; `repo(...)` and `commit(...)` make and change repositories."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        (folder / "mirrors" / "models").mkdir(parents=True, exist_ok=True)
        (folder / "cfg.toml").write_text(f"""[basic]
host = "127.0.0.1"
port = {self.port}
repos-path = "{folder / 'repos'}"
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{self.port}"
mirror-lfs-netloc = "127.0.0.1:{self.port}"
mirrors-path = ["{folder / 'mirrors'}"]

[accessibility]
offline = true
""")

    def start(self) -> HubServer:
        log = (self.folder / "olah.log").open("ab")
        self.process = subprocess.Popen([str(olah_binary()), "-c", str(self.folder / "cfg.toml")],
                                        stdout=log, stderr=log, cwd=self.folder)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(self.endpoint + "/api/models/none/none", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"olah did not start; see {self.folder / 'olah.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def commit(self, repo: str, adapter: Path, message: str = "weights") -> str:
        """Put `adapter`'s files in `repo` (made on first use, branch main) as a new commit;
        its hash."""
        path = self.folder / "mirrors" / "models" / repo
        if not (path / ".git").exists():
            path.mkdir(parents=True)
            git("init", "-q", "-b", "main", cwd=path)
        for file in adapter.iterdir():
            if file.is_file():
                shutil.copy(file, path / file.name)
        git("add", "-A", cwd=path)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=path)
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True,
                              capture_output=True, text=True).stdout.strip()

    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10",
                "HF_HOME": str(self.folder / "hf-home")}


def hub_environment(monkeypatch, hub: HubServer) -> None:
    """Point huggingface_hub, in this process, at `hub` (it reads its constants at import)."""
    from huggingface_hub import constants

    for key, value in hub.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    os.environ.pop("HF_HUB_OFFLINE", None)
