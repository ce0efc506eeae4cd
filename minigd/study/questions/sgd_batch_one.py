"""Does "SGD" mean batch size 1?

Answered from the batch-size study (no extra trials): the B = 1 row next to the fastest
mini-batch and the full batch, with the definition.  In the literature and in every
library, "SGD" is the update rule (a step along a stochastic gradient estimate, with or
without momentum), used at any batch size; batch size 1 is the historical special case
("online" or "pure" SGD), and B = N is (deterministic) gradient descent.
"""

from __future__ import annotations

from ._common import arch0, fmt_iv, label_b

NAME = "sgd_batch_one"
QUESTION = 'Does "SGD" mean batch size 1?'
DEFINITION = (
    'No: "SGD" names the update rule -- a step along a gradient estimated on a random batch -- at any '
    'batch size; batch 1 is its oldest special case ("online SGD"), batches of 1 < B < N are '
    '"mini-batch SGD", and B = N is plain gradient descent.'
)


def plan(ctx) -> list:
    return []


def _row(a, B):
    return next((r for r in a["per_batch"] if r["batch_size"] == B), None)


def answer(ctx, rows) -> dict:
    a = arch0(ctx)
    if a is None:
        from . import unanswered

        return unanswered(NAME, "the batch-size study has no successful trials")
    n = ctx.n_train
    one, full = _row(a, 1), _row(a, n)
    fast = (a.get("headline") or {}).get("fastest_wall_time") or {}
    mini = _row(a, fast.get("value")) if fast.get("value") not in (None, 1, n) else None

    def desc(r, name):
        if r is None:
            return f"{name}: not swept"
        if not r.get("reached"):
            return f"{name} (batch {label_b(r['batch_size'], n)}): did not reach the target"
        iv = r.get("intervals") or {}
        return (
            f"{name} (batch {label_b(r['batch_size'], n)}): {fmt_iv(iv.get('steps_to_target'))} steps, "
            f"{fmt_iv(iv.get('examples_to_target'))} examples, {fmt_iv(iv.get('time_to_target'), 's')}"
        )

    parts = [desc(one, "online SGD"), desc(mini, "the fastest mini-batch SGD"), desc(full, "gradient descent")]
    ratio = None
    if one and mini and one.get("reached") and mini.get("reached") and mini.get("time_to_target"):
        ratio = one["time_to_target"] / mini["time_to_target"]
    tail = f" Here batch 1 takes {ratio:.2g}x the fastest mini-batch's time." if ratio is not None else ""
    text = DEFINITION + " Measured to the target: " + "; ".join(parts) + "." + tail
    iv1 = (one or {}).get("intervals", {}).get("time_to_target") if one else None
    return {
        "name": NAME,
        "question": QUESTION,
        "answer": text,
        "value": (iv1 or {}).get("value"),
        "lo": (iv1 or {}).get("lo"),
        "hi": (iv1 or {}).get("hi"),
        "unit": "s (batch 1's wall time to the target)",
        "conditions": ctx.conditions("time = steps to target x the probe's step time"),
        "plot": "steps_examples.png",
        "details": {
            "definition": DEFINITION,
            "batch_one": one and one.get("intervals"),
            "mini_batch": mini and {"batch_size": mini["batch_size"], **(mini.get("intervals") or {})},
            "full_batch": full and full.get("intervals"),
            "batch_one_over_fastest_time": ratio,
        },
    }
