"""Side-by-side timing on a shared machine: contention from other processes measured around
every timed block (:class:`Machine`), and named runners timed in interleaved rounds with
medians per runner (:class:`Rounds`).  See ``bench/README.md``, "Conventions".
"""

from __future__ import annotations

import os
import time

#: a cell whose rounds spread more than this (interquartile range / median) is flagged
NOISY_IQR = 0.25


class Machine:
    """Contention from other processes, measured around every timed block.

    The machine may be shared (other people's test runs): a burst of another process on
    one of two cores makes a two-thread step wait for its descheduled worker thread, and
    the step takes 10-100x longer.  Two signals, both from /proc (Linux; elsewhere nothing
    is checked):

    * before each block, the cores used by other processes (/proc/stat busy time minus
      this process's CPU time) over a short window: while it exceeds ``quiet`` we wait (at
      most ``max_wait`` s per block, ``budget`` s per process, then go on);
    * during each block, the CPU pressure stall (/proc/pressure/cpu "some": time during
      which some runnable task had no CPU) as a fraction of the block's wall time: a block
      above ``stall`` is contended; it is timed again (at most twice), and the medians
      use only uncontended rounds when at least 3 exist.
    """

    def __init__(self, quiet=0.25, stall=0.05, max_wait=3.0, budget=90.0):
        self.quiet, self.stall, self.max_wait, self.budget = quiet, stall, max_wait, budget
        self.retime_budget = budget  # seconds of re-timed blocks per process
        self.retime_s = 0.0
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.has_stat = os.path.exists("/proc/stat")
        self.has_psi = self._psi() is not None
        self.waited = 0.0
        self.blocks = self.retimed = self.contended = 0

    @staticmethod
    def _psi():
        try:
            with open("/proc/pressure/cpu") as f:
                return int(f.readline().rsplit("total=", 1)[1]) * 1e-6
        except (OSError, ValueError, IndexError):
            return None

    def _snap(self):
        busy = 0.0
        if self.has_stat:
            with open("/proc/stat", "rb") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            busy = (sum(v) - v[3] - v[4]) / self.hz
        return busy, time.process_time(), time.perf_counter(), (self._psi() if self.has_psi else 0.0)

    def others(self, a, b) -> float:
        """Cores used by other processes between two snapshots (tick resolution)."""
        dt = b[2] - a[2]
        if not self.has_stat or dt <= 0:
            return 0.0
        return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / dt)

    def stalled(self, a, b) -> float:
        """Fraction of the wall time between two snapshots with a runnable task waiting."""
        dt = b[2] - a[2]
        return (b[3] - a[3]) / dt if dt > 0 else 0.0

    def settle(self, window: float) -> float:
        """Sleep ``window`` seconds, and longer while other processes are busy."""
        start = time.perf_counter()
        while True:
            a = self._snap()
            time.sleep(window)
            load = self.others(a, self._snap())
            extra = time.perf_counter() - start - window
            if load <= self.quiet or extra >= self.max_wait or self.waited + extra >= self.budget:
                self.waited += max(0.0, extra)
                return load

    def time_block(self, fn, k: int, window: float) -> tuple:
        """(seconds per call, contended?) of fn(k), after settling."""
        for attempt in range(3):
            if window:
                self.settle(window)
            a = self._snap()
            t0 = time.perf_counter()
            fn(k)
            dt = time.perf_counter() - t0
            bad = self.stalled(a, self._snap()) > self.stall
            if not bad or not window or attempt == 2 or self.retime_s + dt > self.retime_budget:
                break
            self.retimed += 1
            self.retime_s += dt
        self.blocks += 1
        self.contended += bad
        return dt / k, bad

    def summary(self) -> dict:
        return {
            "blocks": self.blocks,
            "retimed": self.retimed,
            "contended": self.contended,
            "waited_s": round(self.waited, 1),
            "proc_stat": self.has_stat,
            "psi": self.has_psi,
        }


#: one per process (see Machine)
MACHINE = Machine()


class Rounds:
    """Calibrate, then time named runners in interleaved rounds; medians per runner."""

    def __init__(self, runners: dict, rounds: int, target_s: float, gap_s: float):
        self.runners, self.rounds, self.target_s, self.gap_s = runners, rounds, target_s, gap_s

    def run(self) -> dict:
        import numpy as np

        reps = {}
        for name, fn in self.runners.items():
            fn(1)
            fn(1)  # warm-up: JIT, caches, first touch, lazy init
            t0 = time.perf_counter()
            fn(2)
            per = (time.perf_counter() - t0) / 2
            reps[name] = max(1, int(self.target_s / max(per, 1e-7)))
        names = list(self.runners)
        samples = {n: [] for n in names}
        bad = {n: [] for n in names}
        for r in range(self.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                t, b = MACHINE.time_block(self.runners[name], reps[name], self.gap_s)
                samples[name].append(t)
                bad[name].append(b)
        self.samples = {n: np.asarray(v) for n, v in samples.items()}
        self.contended = {n: np.asarray(v, bool) for n, v in bad.items()}
        self.clean = {}
        for n, v in self.samples.items():
            ok = v[~self.contended[n]]
            self.clean[n] = ok if len(ok) >= min(3, len(v)) else v
        return {n: float(np.median(v)) for n, v in self.clean.items()}

    def noisy(self, rel_iqr: float = NOISY_IQR) -> list:
        """Runners whose rounds spread by more than rel_iqr (interquartile range / median)."""
        import numpy as np

        out = []
        for n, v in self.clean.items():
            if len(v) >= 4:
                q1, med, q3 = np.percentile(v, [25, 50, 75])
                if (q3 - q1) > rel_iqr * med:
                    out.append(n)
        return out
