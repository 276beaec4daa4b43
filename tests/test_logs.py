"""Log lines: a name that holds a newline (a folder, an object key) cannot split or forge one."""

from __future__ import annotations

import logging

from entrypoint.logs import PlainFormatter


def test_a_name_with_control_characters_stays_on_one_line():
    formatter = PlainFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("entrypoint.reconcile", logging.WARNING, __file__, 1,
                               "adapter %s: skipped: %s", ("a\nERROR forged: b\r\x1b[31m", "x"),
                               None)
    line = formatter.format(record)
    assert line == ("WARNING entrypoint.reconcile: adapter a\\nERROR forged: b\\r\\x1b[31m: "
                    "skipped: x")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "Traceback (most recent call last):\n" in formatter.format(record)
