"""Intent: what runtime API calls asked for, kept in a file so that it outlives a restart.

Two facts, both about adapters the folder alone does not explain: adapters loaded through the API
(name -> the folder they were loaded from), and folder adapters unloaded through the API (name ->
the fingerprint of the folder's files then: they stay unloaded until those files change). The
reconciler reads both on every pass. File work only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = 1


@dataclass
class Intent:
    """The API's standing requests; `file` is where they are kept (None: not kept)."""

    file: Path | None = None
    loaded: dict[str, Path] = field(default_factory=dict)
    unloaded: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, file: Path) -> Intent:
        """The requests kept in `file`; none when it does not exist. A file that cannot be read
        is set aside (renamed `*.bad`) with one warning, never a reason not to start."""
        intent = cls(file=file)
        try:
            data = json.loads(file.read_text())
            intent.loaded = {str(k): Path(v) for k, v in data["loaded"].items()}
            intent.unloaded = {str(k): str(v) for k, v in data["unloaded"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s: cannot read the adapters loaded through the API (%s); starting "
                        "without them (the file is kept as %s.bad)", file, exc, file.name)
            try:
                os.replace(file, file.with_name(file.name + ".bad"))
            except OSError:
                pass
        return intent

    def save(self) -> None:
        """Write the requests (atomically: a crash leaves the old file or the new one).
        Raises OSError when the file cannot be written. Called on the event loop, never in a
        thread: the file is small, and the dicts are only changed there."""
        if self.file is None:
            return
        data = {"version": VERSION, "loaded": {k: str(v) for k, v in sorted(self.loaded.items())},
                "unloaded": dict(sorted(self.unloaded.items()))}
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.file)
