"""Fresh-process runs: each measurement's allocations never inflate another's high-water mark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class ChildFailed(SystemExit):
    """A child exited non-zero; the message carries its command and the tail of its stderr."""


@dataclass
class ChildResult:
    stdout: str
    stderr: str
    returncode: int
    seconds: float  # wall time, start-up included
    peak_rss: int  # the child's own VmHWM, bytes (the launcher's only, when it spawns further processes)

    def last_json(self) -> dict:
        """The JSON object the child printed last."""
        return json_lines(self.stdout)[-1]


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` that is a JSON object, parsed."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run(cmd: list[str], env: dict | None = None, cwd: Path | str | None = None, check: bool = True) -> ChildResult:
    """Run ``cmd`` to completion: its output, wall seconds and peak RSS (``wait4``'s rusage).

    Output goes to files, not pipes, so a chatty child never blocks on a full pipe while we wait.
    With ``check``, a non-zero exit raises :class:`ChildFailed`.
    """
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=full_env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = ChildResult(out.read(), err.read(), proc.returncode, seconds, usage.ru_maxrss * 1024)
    if check and result.returncode != 0:
        raise ChildFailed(f"{' '.join(map(str, cmd))} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result


def run_json(cmd: list[str], **kw) -> dict:
    """:func:`run`, then the JSON object the child printed last."""
    result = run(cmd, **kw)
    try:
        return result.last_json()
    except (IndexError, json.JSONDecodeError) as e:
        raise ChildFailed(f"{' '.join(map(str, cmd))} printed no JSON:\n{result.stdout[-2000:]}") from e


def script(path: Path | str, *argv: str) -> list[str]:
    """The command line running the Python script ``path`` with this interpreter."""
    return [sys.executable, str(path), *map(str, argv)]
