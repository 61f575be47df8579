"""`edgesd ...` run in this process (Click's CliRunner), answered like a finished process: returncode,
stdout, stderr. Tests use it to spare the seconds a new Python with torch costs each time; a test of what
only a real process shows (signals, a clean interpreter) starts one itself."""

from __future__ import annotations

import os
import signal
import traceback
from contextlib import chdir, nullcontext
from dataclasses import dataclass


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


def edgesd(*args, cwd=None) -> Finished:
    from click.testing import CliRunner

    from edgesd.cli import main

    sigterm = signal.getsignal(signal.SIGTERM)  # export installs its own handler
    try:
        with chdir(cwd) if cwd is not None else nullcontext():
            result = CliRunner().invoke(main, [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))  # as a crashed process would print it
    return Finished(result.exit_code, result.stdout, stderr)
