"""Reports of a batch-size study: figures (PNG), ``summary.md``, ``summary.html`` and
``summary.json`` (the recommendation and every headline number as ``{"value", "lo", "hi",
"wins"}``; see docs/guide/study.md, "What the study answers: summary.json").

>>> from minigd.study.analysis import analyze            # doctest: +SKIP
>>> from minigd.report import write_report               # doctest: +SKIP
>>> write_report(analyze(store.rows()), "report/")        # doctest: +SKIP

Needs matplotlib (``pip install 'minigd[study]'``); it is imported only when a report is
drawn, with the Agg backend.
"""

from .plots import ADAPTIVE_PLOT, PLOT_FILES, PlotResult, make_plots
from .summary import HEADLINE_KEYS, build_blocks, render_html, render_markdown, summary_json, write_report

__all__ = [
    "write_report",
    "make_plots",
    "PlotResult",
    "PLOT_FILES",
    "ADAPTIVE_PLOT",
    "build_blocks",
    "render_markdown",
    "render_html",
    "summary_json",
    "HEADLINE_KEYS",
]
