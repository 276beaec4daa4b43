"""The command line run inside the test process: what a shell would see (exit status, stdout,
stderr), without starting a Python for each call (an interpreter and the CLI's imports cost about
1 s of CPU each; the unit tests made 30 such calls). The console scripts themselves are run for
real once, in tests/test_cli.py."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from typer.testing import CliRunner

from entrypoint.cli import app

#: loggers `setup_logging` quiets: restored after each run, with the root logger's handlers
_QUIETED = ("httpx", "httpcore", "uvicorn.access", "botocore", "boto3", "urllib3")


@dataclass(frozen=True)
class Ran:
    """The fields of `subprocess.CompletedProcess` the tests read."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, env: dict[str, str] | None = None) -> Ran:
    """`lora-entrypoint *args` with this process's environment less its NIM_* variables, plus
    `env`. An exception the CLI lets out (a traceback a user would see) is raised here."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("NIM_")}
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in _QUIETED}
    root.handlers[:] = []  # as in a fresh process: warnings reach stderr (logging's last resort)
    try:
        result = CliRunner().invoke(app, list(args), env={**unset, **(env or {})},
                                    prog_name="lora-entrypoint")
    finally:
        root.handlers[:], level, quieted = saved
        root.setLevel(level)
        for name, was in quieted.items():
            logging.getLogger(name).setLevel(was)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)
