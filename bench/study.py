"""How long the default study takes, and how stable its answer is.

Runs ``minigd study`` with its defaults three times, each into a fresh output directory:

1. cold: Numba's on-disk kernel cache emptied first (a fresh machine's first run);
2. warm, ``--seed 0``;
3. warm, ``--seed 1`` (other trial seeds, data orders and bootstrap draws).

and records the wall time of each, and from the two warm runs' ``summary.json``: the
recommended batch size with its 90% interval and win rate, B_crit with its interval, and
the issue-15 stability criterion: the two recommendations within a factor of two of each
other, and each run's interval holding the other's point estimate.

Writes bench/results/study.md and bench/results/study.json.  ~3 minutes on 2 cores.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import atomic_write, cpu_model  # noqa: E402

ROOT = os.path.dirname(HERE)


def _clear_numba_cache() -> int:
    import minigd.kernels as k

    files = [
        p
        for ext in ("nbi", "nbc")
        for p in glob.glob(os.path.join(os.path.dirname(k.__file__), "**", f"*.{ext}"), recursive=True)
    ]
    for p in files:
        os.remove(p)
    return len(files)


def _run(out: str, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "minigd", "study", "--out", out, "--quiet", *args], check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t0


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="minigd-bench-study-")
    try:
        removed = _clear_numba_cache()
        cold = _run(os.path.join(tmp, "cold"))
        warm0 = _run(os.path.join(tmp, "s0"), "--seed", "0")
        warm1 = _run(os.path.join(tmp, "s1"), "--seed", "1")
        summ = []
        for d in ("s0", "s1"):
            with open(os.path.join(tmp, d, "report", "summary.json")) as f:
                summ.append(json.load(f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    recs = [s["recommendation"] for s in summ]
    bcrit = [s["headline"]["critical_batch_size_fit"] for s in summ]
    b = [r["batch_size"] for r in recs]
    within_2x = max(b) <= 2 * min(b)
    holds = [recs[0]["lo"] <= b[1] <= recs[0]["hi"], recs[1]["lo"] <= b[0] <= recs[1]["hi"]]
    bc_holds = [
        bcrit[0]["lo"] <= bcrit[1]["value"] <= bcrit[0]["hi"],
        bcrit[1]["lo"] <= bcrit[0]["value"] <= bcrit[1]["hi"],
    ]
    res = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "seconds": {"cold": cold, "warm_seed0": warm0, "warm_seed1": warm1},
        "numba_cache_files_removed": removed,
        "recommendation": {"seed0": recs[0], "seed1": recs[1]},
        "critical_batch_size_fit": {"seed0": bcrit[0], "seed1": bcrit[1]},
        "stability": {
            "within_factor_2": within_2x,
            "each_interval_holds_the_other": all(holds),
            "b_crit_intervals_hold_each_other": all(bc_holds),
        },
    }
    atomic_write(os.path.join(HERE, "results", "study.json"), json.dumps(res, indent=1, default=str))
    fmt = lambda r: f"{r['batch_size']} [{r['lo']}, {r['hi']}], wins {100 * r['wins']:.0f}%"
    fb = lambda x: f"{x['value']:.4g} [{x['lo']:.4g}, {x['hi']:.4g}]"
    md = [
        "# `minigd study` defaults: time and stability",
        "",
        f"Machine: {res['machine']['cpus']} CPUs, {res['machine']['cpu']}, Python {res['machine']['python']}, "
        f"{res['machine']['date']}. `python bench/study.py`.",
        "",
        "| run | wall time | recommended batch size [90% interval], wins | B_crit [90% interval] |",
        "|---|---:|---|---|",
        f"| cold (Numba cache emptied), --seed 0 | {cold:.1f} s | | |",
        f"| warm, --seed 0 | {warm0:.1f} s | {fmt(recs[0])} | {fb(bcrit[0])} |",
        f"| warm, --seed 1 | {warm1:.1f} s | {fmt(recs[1])} | {fb(bcrit[1])} |",
        "",
        f"Recommendations within a factor of 2: **{within_2x}**; each interval holds the other's "
        f"recommendation: **{all(holds)}**; each B_crit interval holds the other's B_crit: **{all(bc_holds)}**.",
        "",
    ]
    atomic_write(os.path.join(HERE, "results", "study.md"), "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
