"""A list file as the source (KServe's `adapters: [{name, uri}]`): folder and hf:// entries,
against the real Hub-compatible server of the tests (olah) for the Hub."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from entrypoint.adapters.files import Kind
from entrypoint.adapters.rank import RankLimit
from entrypoint.sources import source_for
from entrypoint.sources.listfile import ListSource
from tests.clock import SteppedClock
from tests.conftest import copy_adapter
from tests.hubserver import hub_environment

WEIGHTS = "adapter_model.safetensors"


def write(file: Path, *entries: dict) -> None:
    file.write_text(json.dumps({"adapters": list(entries)}) if file.suffix == ".json" else
                    "adapters:\n" + "".join(
                        f"  - name: {e['name']}\n    uri: {e['uri']}\n"
                        + (f"    revision: {e['revision']}\n" if "revision" in e else "")
                        for e in entries))


def by_name(folders) -> dict:
    return {f.name: f for f in folders}


@pytest.fixture
def listed(tmp_path):
    file = tmp_path / "etc" / "adapters.yaml"
    file.parent.mkdir()
    return file


def test_folder_entries_are_served_under_the_names_the_list_gives(tmp_path, library, listed):
    copy_adapter(library / "alpha", tmp_path / "store" / "a1")
    copy_adapter(library / "beta", tmp_path / "store" / "b1")
    write(listed, {"name": "sql", "uri": str(tmp_path / "store" / "a1")},
          {"name": "chat", "uri": f"file://{tmp_path / 'store' / 'b1'}"})
    source = source_for(listed, downloads=tmp_path / "dl", limit=RankLimit(16))
    assert isinstance(source, ListSource) and source.watch_folder == listed.parent
    found = by_name(source.scan())
    assert set(found) == {"sql", "chat"} and all(f.valid for f in found.values())
    assert found["sql"].path == tmp_path / "store" / "a1"
    write(listed, {"name": "chat", "uri": str(tmp_path / "store" / "a1")})  # changed URI
    found = by_name(source.scan())
    assert set(found) == {"chat"} and found["chat"].path == tmp_path / "store" / "a1"


def test_a_bad_file_is_a_source_problem_and_a_bad_entry_one_line(tmp_path, library, listed,
                                                                 caplog):
    copy_adapter(library / "alpha", tmp_path / "a1")
    write(listed, {"name": "sql", "uri": str(tmp_path / "a1")})
    source = ListSource(listed, downloads=tmp_path / "dl", limit=RankLimit(16))
    assert source.scan()[0].valid
    listed.write_text("adapters: [oops")
    assert source.scan() == [] and "not valid YAML" in source.source_problem
    listed.write_text("models: []")
    assert source.scan() == [] and "no 'adapters:' list" in source.source_problem
    caplog.set_level(logging.ERROR)
    write(listed, {"name": "sql", "uri": str(tmp_path / "a1")},
          {"name": "bad name!", "uri": str(tmp_path / "a1")},
          {"name": "rel", "uri": "relative/path"},
          {"name": "gs", "uri": "gs://bucket/x"},
          {"name": "sql", "uri": str(tmp_path / "a1")})
    for _ in range(3):
        found = by_name(source.scan())
    assert source.source_problem is None and set(found) == {"sql"}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # once each, not once per pass
    assert all(line.startswith(f"NIM_PEFT_SOURCE={listed}: entry ") for line in lines)
    assert any("not an absolute folder" in line for line in lines)
    assert any("repeats the name 'sql'" in line for line in lines)


def test_an_entry_made_bad_keeps_its_last_good_form(tmp_path, library, listed):
    copy_adapter(library / "alpha", tmp_path / "a1")
    write(listed, {"name": "sql", "uri": str(tmp_path / "a1")})
    source = ListSource(listed, downloads=tmp_path / "dl")
    assert source.scan()[0].valid
    write(listed, {"name": "sql", "uri": "not/absolute"})
    (found,) = source.scan()
    assert found.valid and found.path == tmp_path / "a1"


@pytest.fixture
def hub(hub_server, monkeypatch):
    hub_environment(monkeypatch, hub_server)
    return hub_server


def test_a_hub_adapter_follows_its_branch_and_a_pinned_one_stays(hub, tmp_path, library,
                                                                 listed):
    first = hub.commit("acme/follow", library / "alpha")
    pinned = hub.commit("acme/pinned", library / "gamma")
    write(listed, {"name": "follow", "uri": "hf://acme/follow"},
          {"name": "pin", "uri": "hf://acme/pinned", "revision": pinned})
    source = ListSource(listed, downloads=tmp_path / "dl", limit=RankLimit(16))
    found = by_name(source.scan_at_start())
    assert found["follow"].valid and found["follow"].fingerprint == first
    assert (found["follow"].path / WEIGHTS).read_bytes() == \
        (library / "alpha" / WEIGHTS).read_bytes()
    assert found["pin"].valid and found["pin"].fingerprint == pinned
    assert found["follow"].url == f"hf://acme/follow@{first[:12]}"
    calls = source.remote.hub.revision_calls
    assert by_name(source.scan())["follow"] == found["follow"]  # unchanged: nothing fetched
    assert source.remote.hub.revision_calls == calls + 1  # one small call; none for a pinned commit
    second = hub.commit("acme/follow", library / "beta")
    hub.commit("acme/pinned", library / "alpha")
    during = by_name(source.scan())
    assert during["follow"] == found["follow"]  # the old commit serves while the new one comes
    source.remote.hub.wait()
    after = by_name(source.scan())
    assert after["follow"].fingerprint == second and after["follow"].valid
    assert (after["follow"].path / WEIGHTS).read_bytes() == \
        (library / "beta" / WEIGHTS).read_bytes()
    assert after["pin"] == found["pin"]
    assert not found["follow"].path.exists()  # the old commit's download is deleted


def test_a_missing_repo_or_a_hub_outage_is_a_reason_on_that_adapter_only(
        hub, tmp_path, library, listed):
    hub.commit("acme/here", library / "alpha")
    write(listed, {"name": "here", "uri": "hf://acme/here"},
          {"name": "gone", "uri": "hf://acme/no-such-repo"},
          {"name": "branch", "uri": "hf://acme/here", "revision": "no-such-branch"})
    clock = SteppedClock()
    source = ListSource(listed, downloads=tmp_path / "dl", limit=RankLimit(16), clock=clock)
    found = by_name(source.scan_at_start())
    assert found["here"].valid
    assert found["gone"].pending and found["gone"].kind is Kind.DOWNLOAD_FAILED
    assert "hf://acme/no-such-repo was not found" in found["gone"].problem
    assert "HF_TOKEN" in found["gone"].problem
    assert found["branch"].pending and found["branch"].kind is Kind.DOWNLOAD_FAILED
    calls = source.remote.hub.revision_calls
    again = by_name(source.scan())
    assert source.remote.hub.revision_calls == calls + 1  # the two failed ones back off
    assert again["gone"].problem == found["gone"].problem
    hub.stop()
    try:
        for _ in range(4):  # an outage of several intervals, each one retried after its backoff
            clock.step(120)
            during = by_name(source.scan())
            assert during["here"] == found["here"]  # served before: serves on
            assert during["gone"].pending and "did not answer for hf://acme/no-such-repo" in \
                during["gone"].problem and "HF_ENDPOINT" in during["gone"].problem
    finally:
        hub.start()
    clock.step(300)
    assert by_name(source.scan())["here"] == found["here"]  # back: the same commit, kept


def test_an_s3_entry_is_one_adapter_and_goes_with_its_entry(s3_store, bucket, tmp_path, library,
                                                            listed, monkeypatch):
    """`s3://BUCKET/PREFIX` names one adapter (its files directly below), downloaded beside a
    folder entry; the entry removed, its download is deleted."""
    from tests.sources.test_s3 import upload

    for key, value in s3_store.env().items():
        monkeypatch.setenv(key, value)
    upload(s3_store.client(), bucket, "support", library / "gamma")
    copy_adapter(library / "alpha", tmp_path / "a1")
    write(listed, {"name": "support", "uri": f"s3://{bucket}/loras/support"},
          {"name": "local", "uri": str(tmp_path / "a1")})
    source = ListSource(listed, downloads=tmp_path / "dl", limit=RankLimit(16))
    found = by_name(source.scan_at_start())
    for _ in range(40):  # until the store's objects are old enough to be taken as complete
        if found["support"].valid:
            break
        source.remote.wait()
        time.sleep(0.1)
        found = by_name(source.scan())
    assert found["support"].valid and found["local"].valid, found
    assert (found["support"].path / WEIGHTS).read_bytes() == \
        (library / "gamma" / WEIGHTS).read_bytes()
    assert found["support"].url.startswith(f"s3://{bucket}/loras/support")
    write(listed, {"name": "local", "uri": str(tmp_path / "a1")})
    assert set(by_name(source.scan())) == {"local"}
    assert not (tmp_path / "dl" / "s3" / "support").exists()
    source.close()


def test_a_changed_revision_is_a_new_version_of_the_entry(hub, tmp_path, library, listed):
    first = hub.commit("acme/rev", library / "alpha")
    second = hub.commit("acme/rev", library / "beta")
    write(listed, {"name": "rev", "uri": "hf://acme/rev", "revision": first})
    source = ListSource(listed, downloads=tmp_path / "dl", limit=RankLimit(16))
    pinned = by_name(source.scan_at_start())["rev"]
    assert pinned.valid and pinned.fingerprint == first
    assert (pinned.path / WEIGHTS).read_bytes() == (library / "alpha" / WEIGHTS).read_bytes()
    write(listed, {"name": "rev", "uri": "hf://acme/rev", "revision": "main"})
    after = by_name(source.scan_at_start())["rev"]
    assert after.valid and after.fingerprint == second  # a new version: the reconciler swaps
    assert (after.path / WEIGHTS).read_bytes() == (library / "beta" / WEIGHTS).read_bytes()
    source.close()


def test_a_fetch_that_cannot_start_is_a_reason_on_its_entry_only(tmp_path, library, listed):
    """No S3 client, or a profile that does not exist: the entry says so and the pass goes on
    (it raised out of the pass and, every pass failing, stopped the service: found in review)."""
    copy_adapter(library / "alpha", tmp_path / "a1")
    write(listed, {"name": "store", "uri": "s3://bucket/loras/x"},
          {"name": "local", "uri": str(tmp_path / "a1")})

    def no_client(url, downloads):
        raise RuntimeError("the S3 client (boto3) is not installed")

    source = ListSource(listed, downloads=tmp_path / "dl", s3_source=no_client)
    found = by_name(source.scan())
    assert found["local"].valid
    assert found["store"].pending and found["store"].kind is Kind.DOWNLOAD_FAILED
    assert "s3://bucket/loras/x/ cannot be fetched: the S3 client (boto3)" in \
        found["store"].problem


def test_a_hub_config_that_rules_an_adapter_out_costs_no_weights_download(
        hub, tmp_path, library, listed):
    from tests.conftest import edit_config

    dora = copy_adapter(library / "beta", tmp_path / "made" / "dora")
    edit_config(dora, use_dora=True)
    hub.commit("acme/dora", dora)
    write(listed, {"name": "dora", "uri": "hf://acme/dora"})
    source = ListSource(listed, downloads=tmp_path / "dl", limit=RankLimit(16))
    found = by_name(source.scan_at_start())["dora"]
    assert not found.valid and found.problem.startswith("DoRA"), found.problem
    assert not list((tmp_path / "dl").rglob(WEIGHTS))  # the weights were never downloaded


def test_a_hub_fetch_counts_its_bytes_against_the_total_the_hub_gives(
        hub, tmp_path, library, listed, monkeypatch):
    from entrypoint.fetches import FetchLog
    from entrypoint.sources import hub as hub_module

    FETCHES = FetchLog()  # (its own: no other test's download counts here)
    monkeypatch.setattr(hub_module, "FETCHES", FETCHES)
    hub.commit("acme/counted", library / "alpha")
    write(listed, {"name": "counted", "uri": "hf://acme/counted"})
    begun = []
    real = FETCHES.begin
    monkeypatch.setattr(FETCHES, "begin", lambda *a, **k: begun.append(a) or real(*a, **k))
    before = FETCHES.totals()
    found = by_name(ListSource(listed, downloads=tmp_path / "dl",
                               limit=RankLimit(16)).scan_at_start())["counted"]
    assert found.valid
    size = sum((library / "alpha" / f).stat().st_size for f in ("adapter_config.json", WEIGHTS))
    ((name, url, total),) = begun
    assert (name, url, total) == ("counted", found.url, size)
    after = FETCHES.totals()
    assert (after.succeeded - before.succeeded, after.bytes - before.bytes) == (1, size)
