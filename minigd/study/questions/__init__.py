"""The questions people ask about batch size, each answered by an experiment ("arm") run next
to the batch-size study: ``minigd study --questions all`` (or a comma list of names).

Every arm is a module of this package with

``NAME``
    its key in ``summary.json["questions"]`` (one of :data:`QUESTIONS`);
``QUESTION``
    the question as users ask it;
``plan(ctx) -> list[TrialConfig]``
    the extra trials it needs (deterministic in ``ctx``: a resumed study plans the same
    ones, and ``minigd report`` finds them in the store); ``[]`` for an arm that needs none;
``run(ctx) -> list[(TrialConfig, dict)]`` (optional)
    instead of ``plan``, for an arm whose trials depend on earlier ones (a search): it
    runs them through ``ctx.run_trials`` and returns them;
``answer(ctx, rows) -> dict``
    the answer from its rows (pure given the rows and the stored probe entries), drawing
    its figure to ``ctx.plot_path(NAME)`` when ``ctx.report_dir`` is set.

An answer is a JSON-serialisable dict::

    {"name", "question",
     "answer":     one or two plain sentences with the measured numbers and 90% intervals,
     "value", "lo", "hi", "unit", (optional "wins"): the headline number,
     "conditions": the model, data, machine and budget the answer holds for,
     "plot":       the figure's file name in the report directory, or None,
     "details":    the numbers behind it}

An arm that cannot answer (too few trials reached, a search needing Optuna that is missing)
says so in ``"answer"`` with ``value`` None; it never raises into the study (its error is
recorded in the answer).

Every arm's trials are tagged ``search_id = "q:<name>"`` and stored in the study's
``results.sqlite`` like the grid's (resumable, Dask-capable); their keys are stored in the
meta entry ``question_keys`` so ``minigd report`` re-answers from the file alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

QUESTIONS = (
    "smallest_batch",
    "sgd_batch_one",
    "width_one",
    "powers_of_two",
    "lr_scaling",
    "grow_vs_decay",
    "generalisation",
    "search_strategies",
)


def parse_questions(text) -> tuple:
    """``"all"`` or a comma list of names -> a tuple of names in :data:`QUESTIONS` order;
    ValueError naming ``questions`` for an unknown one."""
    if text is None or text == "" or text == ():
        return ()
    names = QUESTIONS if text == "all" else [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in QUESTIONS]
    if bad or not names:
        raise ValueError(f"questions: expected 'all' or a comma list of {', '.join(QUESTIONS)}, got {text!r}")
    return tuple(q for q in QUESTIONS if q in names)


def arm(name: str):
    """The module answering question ``name``."""
    if name not in QUESTIONS:
        raise ValueError(f"name: expected one of {', '.join(QUESTIONS)}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def tag(cfg, name: str):
    """``cfg`` as a trial of question ``name``'s arm (kept apart from the grid's trials)."""
    return dataclasses.replace(cfg, search_id=f"q:{name}")


class _Shape:
    """Stands for an array of which only the shape is known."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __len__(self):
        return self.shape[0]


class StoredData:
    """The shape of a study's data, read from its stored trials: what ``minigd report``
    gives the arms as ``ctx.ds`` instead of loading the data (it never opens a data path
    named inside a results file).  ``X_train`` has a ``shape`` and a length, no values."""

    def __init__(self, n_train: int, n_in: int, n_out: int, task: str):
        self.X_train = _Shape((n_train, n_in))
        self.n_out = n_out
        self.task = task


@dataclass
class QuestionContext:
    """What an arm sees: the study, its data and results, and the means to run more.

    Attributes
    ----------
    spec : SweepSpec
        The study's specification (``spec.seed`` is the master seed).
    ds : minigd.data.Dataset or StoredData
        The study's data (read-only: only its shape and task, from the stored trials).
    main_rows : list of (TrialConfig, dict)
        The grid's trials (with the learning-rate extensions; the adaptive arm's are left out).
    main_analysis : dict
        :func:`minigd.study.analysis.analyze` of ``main_rows`` with the probe.
    main_probe : list of dict
        The throughput probe entries of the grid's batch sizes (the adaptive ones left out).
    store : ResultStore
    executor : an executor of :mod:`minigd.study.executors`, or None (read-only: ``minigd
        report`` answers from stored trials and probe entries only)
    report_dir : str or None
        Where figures go (None: draw nothing).
    """

    spec: Any
    ds: Any
    main_rows: list
    main_analysis: dict
    main_probe: list
    store: Any
    executor: Any = None
    report_dir: str | None = None
    log: Callable[[str], None] = field(default=lambda line: None)
    progress: bool = False
    name: str = ""  # the arm being answered (set by answer_questions)
    keys: list = field(default_factory=list)  # the keys of the trials it ran or found

    def __post_init__(self):
        # the arms compare fixed batch sizes: the adaptive arm's trials and probe entries
        # (SweepSpec.adaptive) are not theirs to see
        self.main_rows = [(c, r) for c, r in (self.main_rows or []) if not getattr(c, "is_adaptive", False)]
        self.main_probe = [
            e for e in (self.main_probe or []) if not (isinstance(e, dict) and e.get("adaptive") is not None)
        ]

    @property
    def readonly(self) -> bool:
        return self.executor is None

    @property
    def seed(self) -> int:
        return int(self.spec.seed)

    @property
    def n_train(self) -> int:
        return len(self.ds.X_train)

    def base_config(self, **changes):
        """A trial like the grid's (data, model, optimizer, budget, target), with changes."""
        from minigd.study.config import TrialConfig

        n_in, n_out = self.ds.X_train.shape[1], self.ds.n_out
        s = self.spec
        base = TrialConfig(
            data=s.data,
            sizes=(n_in,) + (s.widths[0],) * s.depths[0] + (n_out,),
            activation=s.activation,
            dtype=s.dtype,
            backend=s.backend,
            batch_size=32,
            optimizer=s.optimizer,
            lr=s.base_lr,
            momentum=s.momentum,
            lr_policy="tuned",
            base_batch_size=s.base_batch_size,
            base_lr=s.base_lr,
            seed=0,
            max_epochs=s.max_epochs,
            min_steps=s.min_steps,
            target_metric=s.target_metric,
            target=s.target,
        )
        return dataclasses.replace(base, **changes)

    def run_trials(self, configs) -> list:
        """Run (or find in the store) ``configs``, tagged as this arm's; returns their
        (config, result) pairs in the order given.  Read-only: stored ones only."""
        from minigd.study.sweep import run_sweep

        configs = [c if c.search_id.startswith("q:") else tag(c, self.name) for c in configs]
        if not self.readonly:
            todo = [c for c in configs if c.key not in self.store.keys()]
            if todo:
                self.log(f"  {self.name}: {len(todo)} trials")
                run_sweep(todo, self.store, executor=self.executor, progress=self.progress)
        self.keys.extend(c.key for c in configs)
        stored = {c.key: (c, r) for c, r in self.store.rows()}
        return [stored[c.key] for c in configs if c.key in stored]

    def probe(self, configs, *, rounds: int | None = None) -> list:
        """Throughput probe entries for ``configs`` (see :mod:`minigd.study.probe`), stored
        under this arm and re-used on a resumed study or by ``minigd report``."""
        from minigd.study.probe import ROUNDS, probe, probe_jobs, probe_key

        jobs = probe_jobs(configs)
        meta = f"probe:{self.name}"
        old = self.store.meta(meta) or []
        have = {e.get("key"): e for e in old if isinstance(e, dict)}
        need = [probe_key(c) for c in jobs]
        if all(k in have for k in need) and (
            self.readonly or all(have[k].get("host") == platform.node() for k in need)
        ):
            return [have[k] for k in need]
        if self.readonly:
            return [have[k] for k in need if k in have]
        self.log(f"  {self.name}: timing {len(jobs)} step(s) (throughput probe)")
        entries = probe(jobs, rounds=rounds or ROUNDS, seed=self.seed)
        self.store.set_meta(meta, entries)
        return entries

    def plot_path(self, name: str) -> str | None:
        if not self.report_dir:
            return None
        os.makedirs(self.report_dir, exist_ok=True)
        return os.path.join(self.report_dir, f"q_{name}.png")

    def conditions(self, budget: str = "") -> str:
        """The conditions sentence: model, data, machine (and the arm's budget)."""
        s = self.spec
        sizes = "-".join(map(str, (self.ds.X_train.shape[1],) + (s.widths[0],) * s.depths[0] + (self.ds.n_out,)))
        from minigd.study.executors import cpu_model

        cpu = cpu_model()
        what = (
            f"MLP {sizes} ({s.activation}, {s.optimizer}, momentum {s.momentum:g}, {s.dtype}) on "
            f"{s.data.name} ({self.n_train} training examples), target {s.target_metric} "
            f"{'>=' if 'accuracy' in s.target_metric else '<='} {s.target:g}; {cpu}, one thread"
        )
        plain = [
            n
            for n, on in (
                ("batch norm", s.batch_norm is not False),
                ("dropout", s.dropout > 0),
                ("learning-rate warm-up", s.warmup_steps > 0),
            )
            if on
        ]
        if plain:  # base_config trains the plain model: say so rather than describe the grid's
            what += f" (the arm's own trials without the study's {', '.join(plain)})"
        if len(s.widths) > 1 or len(s.depths) > 1:
            what += " (the first of the study's widths and depths)"
        return what + (f"; {budget}" if budget else "")


def unanswered(name: str, why: str, **extra) -> dict:
    """The answer of an arm that could not answer, saying why."""
    mod_q = getattr(arm(name), "QUESTION", name)
    return {
        "name": name,
        "question": mod_q,
        "answer": f"Not answered: {why}",
        "value": None,
        "lo": None,
        "hi": None,
        "unit": None,
        "conditions": "",
        "plot": None,
        "details": {},
        **extra,
    }


def answer_questions(ctx: QuestionContext, names) -> dict:
    """Run (unless read-only) and answer every question of ``names``; returns
    ``{name: answer}`` and stores the trial keys of each arm in the meta ``question_keys``.
    An arm that fails is recorded as unanswered with its error, and the others go on."""
    from minigd.study.store import _finite_json

    out = {}
    stored_keys = ctx.store.meta("question_keys") or {}
    keys = dict(stored_keys) if isinstance(stored_keys, dict) else {}
    for name in names:
        mod = arm(name)
        ctx.name, ctx.keys = name, []
        try:
            if not ctx.readonly:
                ctx.log(f"question {name}: {mod.QUESTION}")
            if hasattr(mod, "run"):
                rows = mod.run(ctx)
            else:
                rows = ctx.run_trials(mod.plan(ctx))
            ans = mod.answer(ctx, rows)
            ans.setdefault("name", name)
            ans.setdefault("question", mod.QUESTION)
        except Exception as exc:  # one arm's failure must not cost the study its other answers
            ans = unanswered(name, f"the arm failed ({type(exc).__name__}: {exc})", error=traceback.format_exc(limit=8))
        out[name] = _finite_json(ans)
        keys[name] = sorted(set(ctx.keys))  # also [] for an arm with no trials of its own
    if not ctx.readonly:
        ctx.store.set_meta("question_keys", keys)
    return out
