"""The two figure primitives every minigd figure is drawn with: matplotlib's pyplot on the
Agg backend (imported only when a figure is drawn), and an atomic PNG write.

They sit below both users: the study's question arms (``minigd.study.questions``) draw
their figures with them, and so does the report (``minigd.report``), which reads the
study's analysis -- so the study never imports the report.
"""

from __future__ import annotations

from minigd._io import atomic_path

#: resolution of every PNG minigd writes
DPI = 100


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("minigd.report needs matplotlib to draw its figures: pip install 'minigd[study]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, description: str = "") -> None:
    """Write ``fig`` to ``path`` as a PNG (atomically: a reader never sees half a file, and
    a failed write leaves any older file in place), then close it.  ``description`` goes
    into the PNG's metadata."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata={"Description": description or "minigd report"})
    finally:
        plt.close(fig)
