"""A study-like parent process whose two pool workers hang in a trial, for the tests of
what happens to workers when their parent is interrupted (tests/test_cli.py) or killed
(tests/test_study.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, {root!r})

def hang(i):
    with open(os.path.join({d!r}, f"worker-{{os.getpid()}}"), "w"):
        pass
    time.sleep(120)
    return {{"status": "ok"}}

def run_pool():
    from minigd.study.executors import LocalExecutor
    for _ in LocalExecutor(2).run(hang, [0, 1]):
        pass

if __name__ == "__main__":
{main}
"""


def start(tmp_path, main: str, **popen_kw):
    """Start the parent (``main``: the indented body of its ``__main__`` block, which calls
    ``run_pool()``) and wait until both workers are inside their trial.  Returns
    (process, worker pids)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "parent.py"
    script.write_text(_SCRIPT.format(root=root, d=str(tmp_path), main=main))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, **popen_kw)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("worker-*"))) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the workers never started")
        time.sleep(0.05)
    return proc, [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
