"""`decide` as a table: for each situation of one adapter name (what we serve, what its folder
holds, what the backend lists), the steps it asks for, in order. Pure: no backend, no files."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrypoint.adapters.folder import AdapterFolder
from entrypoint.reconcile.decide import Observed, Step, decide
from entrypoint.reconcile.registry import AdapterRecord, AdapterState, State

SNAP_V1 = "/snapshots/a-v1"
FOLDER = Path("/loras/a")


def folder(version: str = "v1", *, problem: str | None = None,
           pending: bool = False) -> AdapterFolder:
    return AdapterFolder(name="a", path=FOLDER, fingerprint=version, rank=8, problem=problem,
                         pending=pending)


def state(kind: State = State.READY, *, loaded: str | None = "v1", version: str = "v1",
          refused: str = "", attempts: int = 0, retry_at: float = 0.0,
          reason: str = "") -> AdapterState:
    record = AdapterRecord(name="a", state=kind, source=FOLDER, version=version, reason=reason,
                           loaded_path=Path(SNAP_V1) if loaded else None,
                           loaded_version=loaded or "")
    st = AdapterState(record)
    st.refused, st.attempts, st.retry_at = refused, attempts, retry_at
    return st


SERVED = {"a": SNAP_V1}
OTHER = {"a": "/elsewhere/a"}

CASES = [
    # (what the case is, state, folder, the backend's list, hidden, steps)
    ("new folder", None, folder(), {}, False, (Step.LOAD,)),
    ("new folder, backend list unknown", None, folder(), None, False, (Step.LOAD,)),
    ("served as wanted: nothing", state(), folder(), SERVED, False, ()),
    ("served, list unknown: nothing", state(), folder(), None, False, ()),
    ("new files: swap", state(), folder("v2"), SERVED, False, (Step.LOAD,)),
    ("lost by the backend: load again", state(), folder(), {}, False, (Step.LOAD,)),
    ("another path under the name: load again", state(), folder(), OTHER, False, (Step.LOAD,)),
    ("lost, and the new files are invalid: restore, record",
     state(), folder("v2", problem="bad json"), {}, False,
     (Step.RESTORE, Step.RECORD_INVALID)),
    ("lost, and the new files were refused: restore only",
     state(version="v2", refused="v2"), folder("v2"), {}, False, (Step.RESTORE,)),
    ("invalid and not recorded yet", None, folder(problem="bad json"), {}, False,
     (Step.RECORD_INVALID,)),
    ("invalid and recorded: nothing",
     state(State.FAILED, loaded=None, reason="bad json"), folder(problem="bad json"), {}, False,
     ()),
    ("still being copied: recorded as pending", None, folder(problem="copying", pending=True),
     {}, False, (Step.RECORD_INVALID,)),
    ("refused: nothing until the files change", state(State.FAILED, loaded=None, refused="v1"),
     folder(), {}, False, ()),
    ("refused, files changed: load", state(State.FAILED, loaded=None, refused="v1"),
     folder("v2"), {}, False, (Step.LOAD,)),
    ("folder removed: remove", state(), None, SERVED, False, (Step.REMOVE,)),
    ("nothing anywhere: nothing", None, None, {}, False, ()),
    ("stray in the backend, no folder: unload it, then remove", None, None, OTHER, False,
     (Step.UNLOAD_STRAY, Step.REMOVE)),
    ("stray while the folder is invalid: unload it, record",
     None, folder(problem="bad json"), OTHER, False, (Step.UNLOAD_STRAY, Step.RECORD_INVALID)),
    ("stray while the folder is valid: the load replaces it", None, folder(), OTHER, False,
     (Step.LOAD,)),
    ("folder back mid-removal, same files: call the removal off",
     state(State.REMOVING), folder(), SERVED, False, (Step.CALL_OFF_REMOVAL,)),
    ("folder back mid-removal, new files: load", state(State.REMOVING), folder("v2"), SERVED,
     False, (Step.LOAD,)),
    ("a retry due, but the backend serves these files: settle",
     state(attempts=1), folder(), SERVED, False, (Step.SETTLE,)),
    ("a retry due, list unknown: load", state(attempts=1), folder(), None, False, (Step.LOAD,)),
    ("backing off: nothing", state(attempts=1, retry_at=100.0), folder("v2"), SERVED, False, ()),
    ("unloaded through the API, not shown yet: remove (shows it)", None, None, {}, True,
     (Step.REMOVE,)),
    ("unloaded through the API, shown: nothing", state(State.UNLOADED, loaded=None), None, {},
     True, ()),
    ("unloaded through the API, backend still holds it",
     state(State.UNLOADED, loaded=None), None, OTHER, True, (Step.UNLOAD_STRAY, Step.REMOVE)),
]


@pytest.mark.parametrize(("case", "st", "wanted", "actual", "hidden", "steps"), CASES,
                         ids=[case[0] for case in CASES])
def test_decide(case, st, wanted, actual, hidden, steps):
    seen = Observed(wanted, actual, hidden=hidden, now=50.0)
    assert decide("a", st, seen) == steps


def test_decide_changes_nothing():
    st = state(attempts=1)
    before = (st.record, st.attempts, st.retry_at, st.refused, st.reported)
    decide("a", st, Observed(folder("v2"), SERVED, now=50.0))
    assert (st.record, st.attempts, st.retry_at, st.refused, st.reported) == before
