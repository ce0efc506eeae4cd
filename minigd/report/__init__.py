"""Reports of a batch-size study: figures (PNG), ``summary.md`` and ``summary.html``.

>>> from minigd.study.analysis import analyze            # doctest: +SKIP
>>> from minigd.report import write_report               # doctest: +SKIP
>>> write_report(analyze(store.rows()), "report/")        # doctest: +SKIP

Needs matplotlib (``pip install 'minigd[study]'``); it is imported only when a report is
drawn, with the Agg backend.
"""
from .plots import PLOT_FILES, PlotResult, make_plots
from .summary import build_blocks, render_html, render_markdown, write_report

__all__ = ["write_report", "make_plots", "PlotResult", "PLOT_FILES", "build_blocks",
           "render_markdown", "render_html"]
