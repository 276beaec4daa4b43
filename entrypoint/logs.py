"""Logging set-up: plain lines, or one JSON object per line with NIM_JSONL_LOGGING."""

from __future__ import annotations

import json
import logging
import sys
import time


class JSONLineFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


#: control characters in a message (from a folder, object key or request): shown escaped, so
#: that a name cannot forge or split log lines; tracebacks keep their lines
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f) if c != 0x09} | {
    0x0a: "\\n", 0x0d: "\\r"}


class PlainFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE`, one line per message."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = record.message.translate(_CONTROL)
        return super().formatMessage(record)


def setup_logging(level: str = "INFO", *, jsonl: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if jsonl:
        handler.setFormatter(JSONLineFormatter())
    else:
        handler.setFormatter(
            PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "uvicorn.access", "botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
