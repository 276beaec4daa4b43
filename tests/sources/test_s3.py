"""Adapters from an S3-compatible store (NIM_PEFT_SOURCE=s3://...), against a real one
(SeaweedFS on loopback): what the scanner sees as objects come, change and go, while the store
is down, and with wrong credentials; and how `serve` and `check-adapters` report them."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import boto3
import pytest

from entrypoint.adapters.files import CONFIG_FILE, Kind
from entrypoint.adapters.folder import inspect_folder
from entrypoint.backoff import STORE_CALLS
from entrypoint.config.settings import ConfigError, load_settings
from entrypoint.sources import s3, s3_client
from entrypoint.sources.s3 import S3Source
from entrypoint.sources.s3_client import S3Url
from tests.clirun import Ran, run_cli
from tests.clock import SteppedClock
from tests.e2e.server import BIN, clean_env

WEIGHTS = "adapter_model.safetensors"


def upload(client, bucket: str, name: str, folder: Path, *, only: str | None = None,
           prefix: str = "loras/") -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file() and (only is None or path.name == only):
            client.put_object(Bucket=bucket, Key=f"{prefix}{name}/{path.name}",
                              Body=path.read_bytes())


CLOCK = SteppedClock()  # the sources' clock in these tests: stepped, never slept on


def scanner(store, bucket: str, tmp_path: Path, **client_args) -> S3Source:
    client = boto3.client("s3", endpoint_url=store.endpoint, region_name="us-east-1",
                          aws_access_key_id=client_args.get("key", "lora-test-key"),
                          aws_secret_access_key=client_args.get("secret", "lora-test-secret"))
    return S3Source(S3Url.parse(f"s3://{bucket}/loras"), downloads=tmp_path / "downloads",
                    client=client, clock=CLOCK)


def by_name(folders) -> dict:
    return {f.name: f for f in folders}


def look(scan: S3Source) -> dict:
    """A pass, and the pass after the downloads it started (what the watcher's wake gives)."""
    scan.scan()
    scan.wait_downloads()
    return by_name(scan.scan())


def test_a_complete_adapter_is_downloaded_whole_and_described_by_its_url(
        s3_store, bucket, library, tmp_path):
    client = s3_store.client()
    upload(client, bucket, "alpha", library / "alpha")
    CLOCK.step(s3.SETTLE_SECS + 2.1)  # older than the settle time by the store's clock
    scan = scanner(s3_store, bucket, tmp_path)
    first = by_name(scan.scan())["alpha"]  # complete: its download starts beside the pass
    assert first.pending and first.problem.startswith("downloading from s3://")
    alpha = look(scan)["alpha"]
    assert alpha.valid and alpha.rank == 8
    assert alpha.url == f"s3://{bucket}/loras/alpha/"
    assert (alpha.path / WEIGHTS).read_bytes() == (library / "alpha" / WEIGHTS).read_bytes()
    assert (alpha.path / CONFIG_FILE).read_bytes() == (library / "alpha" / CONFIG_FILE).read_bytes()
    # The same validation as a folder: the same rank, modules and verdict.
    local = inspect_folder(library / "alpha")
    assert (alpha.rank, alpha.target_modules, alpha.problem) == (
        local.rank, local.target_modules, local.problem)
    # An unchanged store: one list call, no download, the same description.
    calls = scan.list_calls
    again = by_name(scan.scan())["alpha"]
    assert again is alpha and scan.list_calls == calls + 1


def test_never_half_an_adapter_while_it_uploads(s3_store, bucket, library, tmp_path):
    client = s3_store.client()
    scan = scanner(s3_store, bucket, tmp_path)
    upload(client, bucket, "beta", library / "beta", only=CONFIG_FILE)
    beta = by_name(scan.scan())["beta"]
    assert beta.pending and "no adapter_model.safetensors" in beta.problem
    upload(client, bucket, "beta", library / "beta", only=WEIGHTS)
    beta = by_name(scan.scan())["beta"]  # just uploaded: the next listing must agree
    assert beta.pending and beta.problem.startswith("uploading")
    assert not any((tmp_path / "downloads").glob("beta-*"))  # nothing downloaded yet
    CLOCK.step(s3.SETTLE_SECS)
    beta = look(scan)["beta"]
    assert beta.valid, beta.problem
    # Weights first, config last: complete as soon as a listing shows the config changed last.
    upload(client, bucket, "gamma", library / "gamma", only=WEIGHTS)
    assert by_name(scan.scan())["gamma"].pending
    upload(client, bucket, "gamma", library / "gamma", only=CONFIG_FILE)
    gamma = look(scan)["gamma"]
    assert gamma.valid, gamma.problem


def test_a_changed_adapter_is_a_new_version_and_a_deleted_one_is_gone(
        s3_store, bucket, library, tmp_path):
    client = s3_store.client()
    upload(client, bucket, "alpha", library / "alpha")
    scan = scanner(s3_store, bucket, tmp_path)
    scan.scan_at_start()
    first = by_name(scan.scan())["alpha"]
    assert first.valid
    upload(client, bucket, "alpha", library / "beta", only=WEIGHTS)  # new weights, same name
    assert by_name(scan.scan())["alpha"].pending  # until a second listing agrees
    CLOCK.step(s3.SETTLE_SECS)
    second = look(scan)["alpha"]
    assert second.valid and second.fingerprint != first.fingerprint
    assert (second.path / WEIGHTS).read_bytes() == (library / "beta" / WEIGHTS).read_bytes()
    assert not first.path.exists()  # the old download is deleted (snapshots are copies)
    # Deleting its config and weights removes the adapter: a README and a folder marker left
    # behind (SeaweedFS lists such prefixes on, the AWS console makes them) are no adapter.
    client.put_object(Bucket=bucket, Key="loras/alpha/", Body=b"")
    for key in (CONFIG_FILE, WEIGHTS):
        client.delete_object(Bucket=bucket, Key=f"loras/alpha/{key}")
    assert "alpha" not in by_name(scan.scan())
    assert not second.path.exists()


def test_bad_objects_get_a_reason_and_never_stop_the_scan(s3_store, bucket, library, tmp_path):
    client = s3_store.client()
    upload(client, bucket, "good", library / "alpha")
    upload(client, bucket, "bad name!", library / "alpha")
    client.put_object(Bucket=bucket, Key="loras/nested/deeper/adapter_config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="loras/broken/adapter_config.json", Body=b"{nope")
    client.put_object(Bucket=bucket, Key=f"loras/broken/{WEIGHTS}",
                      Body=(library / "alpha" / WEIGHTS).read_bytes())
    client.put_object(Bucket=bucket, Key="loras/huge/adapter_config.json",
                      Body=b" " * (s3.MAX_CONFIG_BYTES + 1))
    client.put_object(Bucket=bucket, Key=f"loras/huge/{WEIGHTS}", Body=b"x")
    client.put_object(Bucket=bucket, Key="loras/short/adapter_config.json",
                      Body=(library / "alpha" / CONFIG_FILE).read_bytes())
    client.put_object(Bucket=bucket, Key=f"loras/short/{WEIGHTS}", Body=b"\x08\x00")
    client.put_object(Bucket=bucket, Key="loras/.hidden/adapter_config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="loras/README.md", Body=b"beside the adapters")
    CLOCK.step(s3.SETTLE_SECS + 2.1)
    found = look(scanner(s3_store, bucket, tmp_path))
    assert set(found) == {"good", "bad name!", "nested", "broken", "huge", "short"}
    assert found["good"].valid
    assert "prefix name" in found["bad name!"].problem
    assert "no adapter files directly under" in found["nested"].problem
    assert found["broken"].problem == "adapter_config.json is not valid JSON"
    assert "a config over 1 MiB is not read" in found["huge"].problem
    # Objects are whole: a short weights file is invalid, not "still being written".
    assert found["short"].problem == "weights file is truncated or malformed"
    assert not any(f.pending for f in found.values())


def test_an_outage_keeps_what_was_listed_and_backs_off(s3_store, bucket, library, tmp_path):
    client = s3_store.client()
    upload(client, bucket, "alpha", library / "alpha")
    scan = scanner(s3_store, bucket, tmp_path)
    before = by_name(scan.scan_at_start())
    assert before["alpha"].valid
    s3_store.stop()
    try:
        during = by_name(scan.scan())
        assert during == before  # never an empty store: nothing would be unloaded
        assert "cannot be reached" in scan.source_problem
        assert "AWS_ENDPOINT_URL" in scan.source_problem and not scan.fatal
        calls = scan.list_calls, scan.failures
        assert by_name(scan.scan()) == before
        assert (scan.list_calls, scan.failures) == calls  # backing off: no call at once
    finally:
        s3_store.start()
    CLOCK.step(STORE_CALLS.base)
    assert by_name(scan.scan()) == before and scan.source_problem is None
    upload(client, bucket, "beta", library / "beta")
    scan.scan()
    CLOCK.step(s3.SETTLE_SECS)
    assert look(scan)["beta"].valid


@pytest.mark.parametrize(("key", "secret", "names"), [
    ("nobody", "lora-test-secret", "AWS_ACCESS_KEY_ID"),
    ("lora-test-key", "wrong", "AWS_SECRET_ACCESS_KEY"),
])
def test_wrong_credentials_name_the_variable(s3_store, bucket, tmp_path, key, secret, names):
    scan = scanner(s3_store, bucket, tmp_path, key=key, secret=secret)
    assert scan.scan() == []
    assert names in scan.source_problem and scan.fatal


def test_a_missing_bucket_names_it(s3_store, tmp_path):
    scan = scanner(s3_store, "no-such-bucket-here", tmp_path)
    assert scan.scan() == []
    assert "bucket 'no-such-bucket-here' does not exist" in scan.source_problem and scan.fatal


def test_the_setting_reads_s3_urls_and_refuses_other_schemes(monkeypatch):
    assert str(load_settings(need_model=False, peft_source="s3://b/a/b/").peft_source) == \
        "s3://b/a/b/"
    assert load_settings(need_model=False, peft_source="s3://b").peft_source == S3Url("b", "")
    for bad, says in (("gs://b/p", "only folders and s3:// URLs"),
                      ("s3:///p", "bucket name is missing"),
                      ("s3://b/a/../c", "'..' part")):
        with pytest.raises(ConfigError, match="NIM_PEFT_SOURCE=") as exc:
            load_settings(need_model=False, peft_source=bad)
        assert says in str(exc.value)


def cli(*args: str, **env: str) -> Ran:
    """The command in this process; AWS_* settings too are read from the environment."""
    return run_cli(*args, env=env)


def serve_process(**env: str) -> subprocess.CompletedProcess[str]:
    """A real `lora-entrypoint serve` process."""
    return subprocess.run([str(BIN), "serve"], capture_output=True, text=True, timeout=120,
                          env=clean_env(**env))


def test_serve_stops_at_start_on_bad_credentials_or_bucket(s3_store, bucket, tiny_model,
                                                           tmp_path):
    base = {"NIM_MODEL_NAME": str(tiny_model), "NIM_CACHE_PATH": str(tmp_path),
            "NIM_PEFT_REFRESH_INTERVAL": "5"}
    for env, says in (
        (s3_store.env(AWS_ACCESS_KEY_ID="nobody"), "check AWS_ACCESS_KEY_ID"),
        (s3_store.env(AWS_SECRET_ACCESS_KEY="x"), "check AWS_SECRET_ACCESS_KEY"),
        (s3_store.env(NIM_PEFT_SOURCE="s3://missing-bucket-x/loras"), "does not exist"),
    ):
        done = cli("serve", "--dry-run",
                       **{"NIM_PEFT_SOURCE": f"s3://{bucket}/loras", **base, **env})
        assert done.returncode == 2, done.stdout  # a setting error, as every other
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: NIM_PEFT_SOURCE=s3://"), lines
        assert says in lines[0]


def test_check_adapters_reads_an_s3_prefix(s3_store, bucket, library, tmp_path):
    client = s3_store.client()
    upload(client, bucket, "alpha", library / "alpha")
    upload(client, bucket, "big", library / "big")
    client.put_object(Bucket=bucket, Key="loras/broken/adapter_config.json", Body=b"[")
    client.put_object(Bucket=bucket, Key=f"loras/broken/{WEIGHTS}", Body=b"x")
    done = cli("check-adapters", "--json", f"s3://{bucket}/loras",
                   NIM_MAX_LORA_RANK="16", NIM_CACHE_PATH=str(tmp_path), **s3_store.env())
    assert done.returncode == 1, done.stderr
    found = {a["name"]: a for a in json.loads(done.stdout)}
    assert found["alpha"]["valid"] and found["alpha"]["path"] == f"s3://{bucket}/loras/alpha/"
    assert "NIM_MAX_LORA_RANK=16" in found["big"]["reason"]
    assert found["broken"]["reason"] == "adapter_config.json is not valid JSON"


def test_a_thousand_adapters_cost_one_listing_per_thousand_keys(s3_store, bucket, tmp_path):
    """An unchanged pass lists and downloads nothing (the benchmark times it against a bare
    listing: benchmarks/s3_listing.py)."""
    config = json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                         "peft_type": "LORA"}).encode()
    s3_store.put_many(bucket, {key: body for i in range(500) for key, body in (
        (f"loras/a{i:04d}/adapter_config.json", config),
        (f"loras/a{i:04d}/{WEIGHTS}", b"not weights"))})  # 1,000 keys
    scan = scanner(s3_store, bucket, tmp_path)
    scan.scan_at_start()
    downloaded = sorted(p.name for p in (tmp_path / "downloads").iterdir())
    assert len(downloaded) == 500
    calls = scan.list_calls
    assert len(scan.scan()) == 500
    assert scan.list_calls == calls + 1
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == downloaded


def test_without_the_s3_extra_the_setting_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "boto3" else real(name, *a))
    with pytest.raises(ConfigError) as exc:
        load_settings(need_model=False, peft_source="s3://bucket/loras")
    assert str(exc.value).startswith("NIM_PEFT_SOURCE=s3://bucket/loras/: ")
    assert "pip install 'lora-entrypoint[s3]'" in str(exc.value)


def test_an_overwrite_caught_half_way_is_never_taken_for_a_version(
        s3_store, bucket, library, tmp_path):
    """A new config uploaded first (the small object lands first) over an adapter served: not
    complete on the next listing, and after the settle time the mix of a new config and the old
    weights is refused (the ranks disagree), never served; the weights' arrival completes it."""
    client = s3_store.client()
    upload(client, bucket, "alpha", library / "alpha")
    scan = scanner(s3_store, bucket, tmp_path)
    assert by_name(scan.scan_at_start())["alpha"].valid
    upload(client, bucket, "alpha", library / "big", only=CONFIG_FILE)  # r=64 over rank-8 weights
    assert by_name(scan.scan())["alpha"].problem.startswith("uploading")
    CLOCK.step(s3.SETTLE_SECS)
    mixed = look(scan)["alpha"]
    assert not mixed.valid and not mixed.pending
    assert "rank-8 tensors but adapter_config.json says r=64" in mixed.problem
    upload(client, bucket, "alpha", library / "big", only=WEIGHTS)
    scan.scan()
    CLOCK.step(s3.SETTLE_SECS)
    whole = look(scan)["alpha"]
    assert whole.valid and whole.rank == 64


def test_files_beside_an_adapter_are_not_part_of_it(s3_store, bucket, library, tmp_path):
    """A training job writing logs into the prefix: neither keeps a new adapter pending nor
    makes a served one a new version (no download, no reload)."""
    client = s3_store.client()
    upload(client, bucket, "alpha", library / "alpha")
    scan = scanner(s3_store, bucket, tmp_path)
    alpha = by_name(scan.scan_at_start())["alpha"]
    assert alpha.valid
    for step in range(3):
        client.put_object(Bucket=bucket, Key="loras/alpha/logs/train.log", Body=b"x" * step)
        client.put_object(Bucket=bucket, Key="loras/alpha/README.md", Body=b"y" * step)
        assert by_name(scan.scan())["alpha"] is alpha


def test_an_endpoint_that_is_not_s3_is_a_problem_not_an_empty_store(tmp_path):
    """A proxy's maintenance page (200, HTML) must not read as a bucket with no adapters: that
    would unload every adapter."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b"<html><body>Down for maintenance</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{server.server_port}",
                              region_name="us-east-1", aws_access_key_id="k",
                              aws_secret_access_key="s")
        scan = S3Source(S3Url("bucket", "loras/"), downloads=tmp_path, client=client)
        assert scan.scan() == []
        assert "not an S3 listing" in scan.source_problem and "AWS_ENDPOINT_URL" in \
            scan.source_problem
    finally:
        server.shutdown()


def test_a_store_that_never_answers_holds_a_pass_seconds_not_minutes(tmp_path, monkeypatch):
    import socket

    for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(s3_client, "READ_TIMEOUT_SECS", 2.0)  # (10 s in service: same rule)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts (the kernel does), never answers
    try:
        scan = S3Source(S3Url("bucket", "loras/"), downloads=tmp_path,
                         client=s3.make_client(f"http://127.0.0.1:{silent.getsockname()[1]}"))
        started = time.monotonic()
        assert scan.scan() == []
        took = time.monotonic() - started
        assert took < 2 * s3_client.READ_TIMEOUT_SECS, took  # one read timeout, no retries inside
        assert "did not answer within" in scan.source_problem and not scan.fatal
        assert "AWS_ENDPOINT_URL" in scan.source_problem
    finally:
        silent.close()


def test_a_download_that_keeps_failing_backs_off_with_one_reason(s3_store, bucket, library,
                                                                 tmp_path, caplog):
    """Credentials that may list but not read (a policy without s3:GetObject): the adapter is
    pending with one reason that says so, logged once, and its download is retried with
    backoff, not at every pass."""
    from tests.s3store import LIST_ONLY_KEY, LIST_ONLY_SECRET

    upload(s3_store.client(), bucket, "alpha", library / "alpha")
    CLOCK.step(s3.SETTLE_SECS + 2.1)
    scan = scanner(s3_store, bucket, tmp_path, key=LIST_ONLY_KEY, secret=LIST_ONLY_SECRET)
    gets = []
    scan.client.meta.events.register("before-call.s3.GetObject", lambda **_: gets.append(1))
    alpha = look(scan)["alpha"]
    assert alpha.pending and "download failed: access denied" in alpha.problem
    assert "s3:GetObject" in alpha.problem
    reasons, passes = set(), 0
    while passes < 20 and (scan.next_retry() or 0) > 0.3:  # quick passes within the backoff
        reasons.add(by_name(scan.scan())["alpha"].problem)
        passes += 1
    assert passes >= 3 and reasons == {alpha.problem}
    assert len(gets) == 1  # backing off: not fetched again
    CLOCK.step(STORE_CALLS.base * 2 + 0.1)
    look(scan)
    assert len(gets) == 2  # tried again after the backoff
    warned = [r for r in caplog.records if "download from" in r.getMessage()]
    assert len(warned) == 1


def test_check_adapters_never_reports_an_unreachable_store_as_empty(tmp_path):
    """Even with NIM_PEFT_REFRESH_INTERVAL set (as in a container's environment): a dead store
    is one line and exit 2, not "0 adapters"; so is an AWS_ENDPOINT_URL that is no URL."""
    for endpoint, says in (("http://127.0.0.1:9", "cannot be reached"),
                           ("minio:9000", "check AWS_ENDPOINT_URL")):
        done = cli("check-adapters", "--json", "s3://bucket/loras",
                       NIM_PEFT_REFRESH_INTERVAL="5", NIM_CACHE_PATH=str(tmp_path),
                       AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="k",
                       AWS_SECRET_ACCESS_KEY="s", AWS_EC2_METADATA_DISABLED="true")
        assert done.returncode == 2 and done.stdout == "", done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: NIM_PEFT_SOURCE=s3://"), lines
        assert says in lines[0]


def test_a_static_server_does_not_start_without_an_adapter_it_cannot_download(
        s3_store, bucket, library, tiny_model, tmp_path):
    from tests.s3store import LIST_ONLY_KEY, LIST_ONLY_SECRET

    upload(s3_store.client(), bucket, "alpha", library / "alpha")
    started = time.monotonic()
    done = serve_process(**s3_store.env(
        AWS_ACCESS_KEY_ID=LIST_ONLY_KEY, AWS_SECRET_ACCESS_KEY=LIST_ONLY_SECRET,
        NIM_MODEL_NAME=str(tiny_model), NIM_CACHE_PATH=str(tmp_path),
        NIM_PEFT_SOURCE=f"s3://{bucket}/loras"))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "adapter alpha could not be downloaded" in lines[0], lines
    assert "s3:GetObject" in lines[0] and time.monotonic() - started < 60


def test_a_download_and_its_snapshot_are_one_copy_on_disk(s3_store, bucket, tmp_path):
    """An s3:// adapter's bytes land once under NIM_CACHE_PATH: the snapshot the backend loads
    links the download's files (20 MiB adapter: 1.0x its bytes, not 2.0x)."""
    from entrypoint.snapshots import SnapshotStore
    from tests.test_snapshots import sized_adapter

    upload(s3_store.client(), bucket, "wide", sized_adapter(tmp_path / "made" / "wide"))
    adapter = sum(f.stat().st_size for f in (tmp_path / "made" / "wide").iterdir())
    scan = scanner(s3_store, bucket, tmp_path)
    (found,) = scan.scan_at_start()
    assert found.valid and found.private
    SnapshotStore(tmp_path / "snapshots").take(found)
    inodes = {(f.stat().st_ino): f.stat().st_size for part in ("downloads", "snapshots")
              for f in (tmp_path / part).rglob("*") if f.is_file()}
    assert sum(inodes.values()) == adapter


def test_a_config_that_rules_an_adapter_out_costs_no_weights_download(
        s3_store, bucket, library, tmp_path):
    from tests.conftest import copy_adapter, edit_config

    dora = copy_adapter(library / "beta", tmp_path / "made" / "dora")
    edit_config(dora, use_dora=True)
    upload(s3_store.client(), bucket, "dora", dora)
    scan = scanner(s3_store, bucket, tmp_path)
    gets = []
    real = scan.client.get_object
    scan.client.get_object = lambda **kw: gets.append(kw["Key"]) or real(**kw)
    (found,) = scan.scan_at_start()
    assert not found.valid and found.problem.startswith("DoRA"), found.problem
    assert gets == [f"loras/dora/{CONFIG_FILE}"]  # the weights were never asked for
    assert by_name(scan.scan())["dora"].problem == found.problem and len(gets) == 1


def test_a_download_under_way_shows_its_bytes_done_of_its_total(s3_store, bucket, tmp_path,
                                                                 monkeypatch):
    import threading

    from entrypoint.fetches import FetchLog
    from entrypoint.sources import s3_downloads
    from tests.test_snapshots import WEIGHTS as WIDE_WEIGHTS
    from tests.test_snapshots import sized_adapter

    FETCHES = FetchLog()  # (its own: no other test's download counts here)
    monkeypatch.setattr(s3_downloads, "FETCHES", FETCHES)

    made = sized_adapter(tmp_path / "made" / "slow-wide")
    upload(s3_store.client(), bucket, "slow-wide", made)
    total = sum(f.stat().st_size for f in made.iterdir())
    scan = scanner(s3_store, bucket, tmp_path)
    release = threading.Event()
    real = scan.client.get_object

    class Held:  # the weights' body: its first chunk, then it waits for the test
        def __init__(self, body) -> None:
            self.body, self.reads = body, 0

        def read(self, size: int) -> bytes:
            self.reads += 1
            if self.reads == 2:
                release.wait(30)
            return self.body.read(size)

    def get_object(**kw):
        answer = real(**kw)
        return {**answer, "Body": Held(answer["Body"])} if kw["Key"].endswith(
            WIDE_WEIGHTS) else answer

    scan.client.get_object = get_object
    before = FETCHES.totals()
    CLOCK.step(s3.SETTLE_SECS + 2.1)  # older than the settle time by the store's clock
    assert by_name(scan.scan())["slow-wide"].kind is Kind.DOWNLOADING  # beside the pass
    deadline = time.monotonic() + 30
    while (FETCHES.progress("slow-wide") or (0, 0))[0] <= 2 << 10:  # the config and a chunk
        assert time.monotonic() < deadline, FETCHES.progress("slow-wide")
        time.sleep(0.01)
    done, whole = FETCHES.progress("slow-wide")
    assert whole == total and 0 < done < total
    release.set()
    scan.wait_downloads(30)
    assert FETCHES.progress("slow-wide") is None
    after = FETCHES.totals()
    assert after.succeeded == before.succeeded + 1 and after.bytes - before.bytes == total
    assert by_name(scan.scan())["slow-wide"].valid


def test_a_config_refused_under_a_lower_rank_limit_is_fetched_whole_once_allowed(
        s3_store, bucket, library, tmp_path):
    """Raising NIM_MAX_LORA_RANK and restarting serves the adapter: the config kept while the
    old limit refused it does not stand for a download."""
    from entrypoint.adapters.rank import RankLimit

    upload(s3_store.client(), bucket, "big", library / "big")  # rank 64
    CLOCK.step(s3.SETTLE_SECS + 2.1)

    def source(rank: int) -> S3Source:
        return S3Source(S3Url.parse(f"s3://{bucket}/loras"), downloads=tmp_path / "downloads",
                        client=s3_store.client(), clock=CLOCK, limit=RankLimit(rank))

    (refused,) = source(16).scan_at_start()
    assert not refused.valid and "rank 64" in refused.problem
    (served,) = source(64).scan_at_start()
    assert served.valid, served.problem
    assert (served.path / WEIGHTS).read_bytes() == (library / "big" / WEIGHTS).read_bytes()
