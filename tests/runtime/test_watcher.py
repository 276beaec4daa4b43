"""The watcher and a list file mounted from a Kubernetes ConfigMap: the kubelet never writes
the file in place; it writes a new timestamped folder and swaps the `..data` link to it. That
swap must wake a pass at once (the interval here is an hour)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from entrypoint.runtime.watcher import FolderWatcher
from entrypoint.sources.listfile import ListSource
from tests.conftest import copy_adapter


def kubelet_update(mount: Path, content: str, stamp: str) -> None:
    """What the kubelet does to a mounted ConfigMap (atomic_writer.go): the data in a new
    `..<stamp>` folder, a `..data_tmp` link renamed over `..data`, the file a link through it."""
    data = mount / f"..{stamp}"
    data.mkdir()
    (data / "adapters.yaml").write_text(content)
    (mount / "..data_tmp").symlink_to(data.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    if not (mount / "adapters.yaml").is_symlink():
        (mount / "adapters.yaml").symlink_to("..data/adapters.yaml")
    for old in mount.glob("..2*"):
        if old.name != data.name:
            shutil.rmtree(old)


def entries(**uris: Path) -> str:
    return "adapters:\n" + "".join(f"  - name: {n}\n    uri: {u}\n" for n, u in uris.items())


def test_a_configmap_update_wakes_a_pass_at_once(tmp_path, library):
    store = tmp_path / "store"
    for name in ("alpha", "beta"):
        copy_adapter(library / name, store / name)
    mount = tmp_path / "etc-lora"
    mount.mkdir()
    kubelet_update(mount, entries(sql=store / "alpha"), "2026_12_03_10_00_00.1")
    source = ListSource(mount / "adapters.yaml", downloads=tmp_path / "dl")
    seen: list[list[str]] = []

    async def look() -> None:
        seen.append(sorted(f.name for f in source.scan() if f.valid))

    async def scenario() -> None:
        await look()  # the service's first pass (the watcher only wakes the next ones)
        assert seen == [["sql"]]
        watcher = FolderWatcher(source.watch_folder, interval=3600, look=look)
        task = asyncio.create_task(watcher.run())
        try:
            await asyncio.sleep(0.2)  # its watches are set
            kubelet_update(mount, entries(sql=store / "alpha", pirate=store / "beta"),
                           "2026_12_03_10_01_00.2")
            for _ in range(100):  # up to 5 s; the interval is an hour
                if seen[-1] == ["pirate", "sql"]:
                    break
                await asyncio.sleep(0.05)
            assert seen[-1] == ["pirate", "sql"], seen
            kubelet_update(mount, entries(pirate=store / "beta"), "2026_12_03_10_02_00.3")
            for _ in range(100):
                if seen[-1] == ["pirate"]:
                    break
                await asyncio.sleep(0.05)
            assert seen[-1] == ["pirate"], seen
            assert watcher.event_driven
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
