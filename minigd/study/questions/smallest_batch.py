"""Is a batch size below 32 ever reasonable?  What is the smallest reasonable batch size?

Answered from the batch-size study itself (no extra trials): the smallest batch size whose
wall time to the target is within :data:`TIME_TOLERANCE` x the least time (with its
bootstrap interval and win rate from the analysis), and the smallest whose examples to the
target are within :data:`EXAMPLES_TOLERANCE` x the fewest.
"""

from __future__ import annotations

from ._common import arch0, fmt_num, label_b

NAME = "smallest_batch"
QUESTION = "Is a batch size below 32 ever reasonable? What is the smallest reasonable batch size?"
TIME_TOLERANCE = 2.0  # the analysis's REASONABLE_TIME_FACTOR
EXAMPLES_TOLERANCE = 2.0


def plan(ctx) -> list:
    return []


def answer(ctx, rows) -> dict:
    from minigd.study.analysis import REASONABLE_TIME_FACTOR

    a = arch0(ctx)
    if a is None:
        from . import unanswered

        return unanswered(NAME, "the batch-size study has no successful trials")
    n = ctx.n_train
    reached = [r for r in a["per_batch"] if r.get("reached") and r.get("time_to_target") is not None]
    head = a.get("headline", {})
    sr = head.get("smallest_reasonable") or {}
    fastest = head.get("fastest_wall_time") or {}
    if not reached or sr.get("value") is None:
        from . import unanswered

        return unanswered(NAME, "no batch size reached the target with a measured time")
    best_t = min(r["time_to_target"] for r in reached)
    ex = [r for r in reached if r.get("examples_to_target") is not None]
    fewest = min(r["examples_to_target"] for r in ex) if ex else None
    small_ex = min(
        (r["batch_size"] for r in ex if r["examples_to_target"] <= EXAMPLES_TOLERANCE * fewest), default=None
    )
    below32 = [r for r in reached if r["batch_size"] < 32 and r["time_to_target"] <= REASONABLE_TIME_FACTOR * best_t]
    smallest_swept = min(r["batch_size"] for r in a["per_batch"])
    swept_below32 = smallest_swept < 32
    verdict = (
        "is reasonable here" if below32 else "is not reasonable here" if swept_below32 else "was not measured here"
    )
    why = (
        f"batch {below32[0]['batch_size']} reaches the target in {fmt_num(below32[0]['time_to_target'], 's')}, "
        f"within {REASONABLE_TIME_FACTOR:g}x the fastest ({fmt_num(best_t, 's')} at batch "
        f"{label_b(fastest.get('value'), n)})"
        if below32
        else f"no batch size below 32 was swept (the smallest is {smallest_swept}); add some to --batch-sizes"
        if not swept_below32
        else f"every batch size below 32 takes more than {REASONABLE_TIME_FACTOR:g}x the fastest time "
        f"({fmt_num(best_t, 's')} at batch {label_b(fastest.get('value'), n)})"
    )
    span = (
        f"batch {sr['value']} in at least 90% of bootstrap resamples"
        if sr.get("lo") == sr.get("hi")
        else f"90% interval: batch {sr.get('lo')} to {sr.get('hi')}"
    )
    edge = (
        " It is the smallest batch size swept: a smaller one may be reasonable too."
        if sr["value"] == smallest_swept
        else ""
    )
    text = (
        f"A batch size below 32 {verdict}: {why}. The smallest reasonable batch size (time to the target "
        f"within {REASONABLE_TIME_FACTOR:g}x the least) is {sr['value']} ({span}), the smallest in "
        f"{100 * (sr.get('wins') or 0):.0f}% of bootstrap resamples; "
        f"by examples to the target (within {EXAMPLES_TOLERANCE:g}x the fewest, {fmt_num(fewest)}) it is "
        f"{small_ex}.{edge}"
    )
    return {
        "name": NAME,
        "question": QUESTION,
        "answer": text,
        "value": sr["value"],
        "lo": sr.get("lo"),
        "hi": sr.get("hi"),
        "wins": sr.get("wins"),
        "unit": "examples per batch",
        "conditions": ctx.conditions(
            f"time = steps to target x the probe's step time; tolerance {REASONABLE_TIME_FACTOR:g}x"
        ),
        "plot": "time_to_target.png",
        "details": {
            "below_32_reasonable": bool(below32) if swept_below32 else None,
            "time_tolerance": REASONABLE_TIME_FACTOR,
            "examples_tolerance": EXAMPLES_TOLERANCE,
            "smallest_by_examples": small_ex,
            "fewest_examples": fewest,
            "least_time_s": best_t,
            "per_batch": [
                {
                    "batch_size": r["batch_size"],
                    "time_to_target": (r.get("intervals") or {}).get("time_to_target"),
                    "examples_to_target": (r.get("intervals") or {}).get("examples_to_target"),
                }
                for r in reached
            ],
        },
    }
