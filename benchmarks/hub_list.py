"""Hub list benchmark: the cost of one pass over an unchanged list of `hf://` entries against
the bare revision calls any client makes to learn each branch's commit, in one run, on a real
Hub-compatible server (olah on loopback, as in the tests).

100 repositories are made (one small synthetic adapter each) and listed in a list file; the
source downloads them once; then passes over the unchanged list alternate with 100 bare
`HfApi().model_info(repo, revision="main")` calls. The ratio reported is the median pass over
the median set of bare calls; revision calls per pass and downloads per pass are counted.

Run: `.venv/bin/python -m benchmarks.hub_list [--entries 100] [--passes 15]
[--out benchmarks/results/hub_list.json]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.fixtures import machine, make_synthetic_adapters, save_result
from tests.hubserver import HubServer

ROOT = Path(__file__).resolve().parent.parent


def run(entries: int, passes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        hub = HubServer(tmp_path / "hub").start()
        try:
            os.environ.update(hub.env())  # (before huggingface_hub is imported)
            from huggingface_hub import HfApi

            from entrypoint.sources.listfile import ListSource

            folders = make_synthetic_adapters(tmp_path / "src", entries)
            for folder in folders:
                hub.commit(f"bench/{folder.name}", folder)
            listed = tmp_path / "adapters.yaml"
            listed.write_text("adapters:\n" + "".join(
                f"  - name: {f.name}\n    uri: hf://bench/{f.name}\n" for f in folders))
            source = ListSource(listed, downloads=tmp_path / "downloads")
            started = time.perf_counter()
            found = source.scan_at_start()
            first_secs = time.perf_counter() - started
            assert len(found) == entries and all(f.valid for f in found), "not all valid"
            downloads = sorted(p.name for p in (tmp_path / "downloads" / "hf").iterdir())
            api = HfApi()
            bare_ms, pass_ms, calls = [], [], []
            for _ in range(passes):
                started = time.perf_counter()
                for folder in folders:
                    api.model_info(f"bench/{folder.name}", revision="main")
                bare_ms.append((time.perf_counter() - started) * 1000)
                before = source.remote.hub.revision_calls
                started = time.perf_counter()
                assert all(f.valid for f in source.scan())
                pass_ms.append((time.perf_counter() - started) * 1000)
                calls.append(source.remote.hub.revision_calls - before)
            after = sorted(p.name for p in (tmp_path / "downloads" / "hf").iterdir())
            source.close()
        finally:
            hub.stop()
    return {
        "machine": machine(),
        "hub": "olah (a Hugging Face Hub mirror) on loopback, offline, git repositories",
        "entries": entries, "passes": passes,
        "first_pass_secs": round(first_secs, 2),
        "bare_revision_calls_ms_median": round(statistics.median(bare_ms), 1),
        "unchanged_pass_ms_median": round(statistics.median(pass_ms), 1),
        "ratio_pass_to_bare_calls": round(statistics.median(pass_ms)
                                          / statistics.median(bare_ms), 3),
        "revision_calls_per_pass": max(calls),
        "downloads_changed_by_unchanged_passes": int(after != downloads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hub_list.json")
    args = parser.parse_args()
    result = run(args.entries, args.passes)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
