"""What to do for one adapter name: a pure function of what is known and what is observed.

`decide` reads an adapter's state (what we serve, backoff, a refusal), the source's folder for
the name (or None), the backend's list (or None when it could not be read) and whether the
runtime API unloaded the name; it returns the steps to take, in order, and never acts. The
reconciler calls it at each pass to know which names need work, and again when the work starts
(the state may have moved while it waited for a slot). Must not do I/O or change a state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from entrypoint.adapters.folder import AdapterFolder
from entrypoint.reconcile.registry import AdapterRecord, AdapterState, State


class Step(enum.Enum):
    UNLOAD_STRAY = "unload stray"  # the backend holds the name while we serve nothing under it
    REMOVE = "remove"  # no folder wants it: closed, drained, unloaded
    RESTORE = "restore"  # the backend lost the version we serve; the folder cannot replace it
    RECORD_INVALID = "record invalid"  # the folder's files are not loadable (or not yet)
    CALL_OFF_REMOVAL = "call off removal"  # a removal not done yet of the very files wanted
    SETTLE = "settle"  # the backend serves the folder's files after all: nothing to retry
    LOAD = "load"  # load, or swap in, the folder's current files


@dataclass(frozen=True)
class Observed:
    """What a pass saw for one name."""

    folder: AdapterFolder | None  # what the sources want under the name (None: nothing)
    actual: dict[str, str] | None  # the backend's adapters (name -> path); None: unknown
    hidden: bool = False  # a folder adapter the runtime API unloaded (its files unchanged)
    now: float = 0.0  # monotonic, for backoffs


def decide(name: str, state: AdapterState | None, seen: Observed) -> tuple[Step, ...]:
    """The steps for `name`, in order; empty when nothing needs doing. A failed step stops
    the ones after it (they are decided again later)."""
    if state is not None and state.backing_off(seen.now):
        return ()  # backing off after a transient error
    stray = is_stray(name, state, seen.actual)
    folder = seen.folder
    if folder is None:
        if not _removal_needed(state, stray, seen.hidden):
            return ()
        return (Step.UNLOAD_STRAY, Step.REMOVE) if stray else (Step.REMOVE,)
    keeps = keeps_previous(state, folder)
    lost = is_lost(state, seen.actual)
    if not ((stray or lost) and keeps) and not _work_on(state, folder, lost):
        return ()
    steps = [Step.UNLOAD_STRAY] if stray and keeps else []
    if lost and keeps:
        steps.append(Step.RESTORE)
    steps.extend(_final_step(state, folder, seen.actual))
    return tuple(steps)


def _removal_needed(state: AdapterState | None, stray: bool, hidden: bool) -> bool:
    if hidden:  # unloaded through the API: shown as such
        return stray or state is None or state.record.state is not State.UNLOADED
    return state is not None or stray


def _work_on(state: AdapterState | None, folder: AdapterFolder, lost: bool) -> bool:
    """The folder asks for something the state does not show yet."""
    if state is None:
        return True
    record = state.record
    if not folder.valid:  # only records the state; nothing to do when already recorded
        return record.version != folder.fingerprint or record.reason != folder.problem
    if state.refused == folder.fingerprint:
        return False  # refused: failed until its files change
    if not state.serving or lost or record.state is State.REMOVING:
        return True  # not loaded, lost, moved; or its folder is back mid-removal
    if not serves(record, folder):
        return True
    # Served as the folder wants: still work while a failed call's retry is due, for the
    # backend may have come to hold this very version anyway; the retry settles the record.
    return state.attempts > 0


def _final_step(state: AdapterState | None, folder: AdapterFolder,
                actual: dict[str, str] | None) -> tuple[Step, ...]:
    if not folder.valid:
        return (Step.RECORD_INVALID,)
    if _calls_off_removal(state, folder, actual):
        return (Step.CALL_OFF_REMOVAL,)
    if _served_after_all(state, folder, actual):
        return (Step.SETTLE,)
    if state is None or state.refused != folder.fingerprint:
        return (Step.LOAD,)
    return ()


def _calls_off_removal(state: AdapterState | None, folder: AdapterFolder,
                       actual: dict[str, str] | None) -> bool:
    """A removal whose unload has not happened yet, of the very files the folder holds again
    (moved out and back, an API unload undone). Found by the chaos run: it stayed `removing`,
    refused, while the backend held it."""
    return (state is not None and state.record.state is State.REMOVING and state.serving
            and not is_lost(state, actual)
            and state.record.loaded_version == folder.fingerprint)


def _served_after_all(state: AdapterState | None, folder: AdapterFolder,
                      actual: dict[str, str] | None) -> bool:
    """The backend's list shows it serving the very snapshot we serve, of the folder's
    current files: a failed load was redundant (sent on a listing read before a swap landed)
    or one that timed out landed later. Found by the chaos run on vLLM: such a failure left the
    record `ready` with "reload will be retried" for ever."""
    return (state is not None and state.serving and actual is not None
            and not is_lost(state, actual) and serves(state.record, folder))


def serves(record: AdapterRecord, folder: AdapterFolder) -> bool:
    """`record` serves `folder`'s current files (an API load from another folder can bring
    files with the same fingerprint, so the folder counts too)."""
    return record.loaded_version == folder.fingerprint and record.source == folder.path


def is_stray(name: str, state: AdapterState | None, actual: dict[str, str] | None) -> bool:
    """The backend holds `name` while we serve nothing under it (a load we gave up on, a
    timeout, that reached it later): it is unloaded, never left to hold stale weights."""
    return actual is not None and name in actual and (state is None or not state.serving)


def is_lost(state: AdapterState | None, actual: dict[str, str] | None) -> bool:
    """The backend's list (when it could be read) lacks the version of an adapter we serve."""
    return (state is not None and state.serving and actual is not None
            and actual.get(state.name) != str(state.record.loaded_path))


def keeps_previous(state: AdapterState | None, folder: AdapterFolder) -> bool:
    """The folder's files will not be loaded, so the previous version stays served."""
    return not folder.valid or (state is not None and state.refused == folder.fingerprint)
