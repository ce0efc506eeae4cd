"""Every ```python block of README.md and docs/**/*.md runs, on the bundled data (issue 18).

The blocks of one page share one namespace and run in page order, like a doctest session: a
page is one test, and a failure names the page, the block and the line in the Markdown file.
They run in a fresh temporary directory (files a block writes, such as checkpoints, land
there) with matplotlib's Agg backend.

A block that must not run says so with another fence language (```bash, ```text, ...) or,
for Python that cannot run here (a cluster address, an optional package the suite does not
install), with the marker ``<!-- skip-test -->`` alone on the line just before its fence.
Skips are counted: ``MAX_SKIPS`` at most, so they stay the exception.  Every fence must name
its language, so no Python block escapes the run by having none.
"""

from __future__ import annotations

import re
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARKER = "<!-- skip-test -->"
MAX_SKIPS = 3
PYTHON_LANGS = {"python", "py"}
# an opening or closing fence: indentation, three or more backticks, an info string
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`]*)$")


def pages() -> list[Path]:
    """README.md and every Markdown page of the docs site, in a fixed order."""
    found = [ROOT / "README.md"]
    docs = ROOT / "docs"
    if docs.is_dir():
        found += sorted(docs.rglob("*.md"))
    return [p for p in found if p.is_file()]


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, first code line (1-based) and text."""

    lang: str
    line: int
    code: str
    skip: bool


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, indented ones (in list items) included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, ticks, info = m.group("indent"), m.group("ticks"), m.group("info").strip()
        lang = info.split()[0].lower() if info else ""
        prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        body = []
        j = i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and close.group("ticks") == ticks and not close.group("info").strip():
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        else:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: code fence never closed")
        out.append(Block(lang, i + 2, textwrap.dedent("\n".join(body)) + "\n", prev == SKIP_MARKER))
        i = j + 1
    return out


def python_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang in PYTHON_LANGS and not b.skip]


RUNNABLE = [p for p in pages() if python_blocks(p)]


@contextmanager
def one_thread():
    """BLAS and Numba pinned to one thread while a page runs, then put back: the examples
    are small, and on a busy machine idle BLAS threads spinning for a core made them 100x
    slower (variance_vs_batch_size: 9.6 s with 2 threads under load, 0.08 s with one)."""
    import numba
    from threadpoolctl import threadpool_limits

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    """The page's Python blocks, in order, in one namespace, in a temporary directory."""
    pytest.importorskip("sklearn")  # the pages train on scikit-learn's bundled digits
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    rel = str(page.relative_to(ROOT))
    namespace: dict = {"__name__": "__docs__"}
    t0 = time.perf_counter()
    with one_thread():
        for k, block in enumerate(python_blocks(page), 1):
            # pad with blank lines so a traceback's line number is the Markdown file's
            code = compile("\n" * (block.line - 1) + block.code, rel, "exec")
            try:
                exec(code, namespace)
            except Exception as exc:
                raise AssertionError(
                    f"{rel}: Python block {k} (line {block.line}) raised {type(exc).__name__}: {exc}"
                ) from exc
    # a page is a reader's session, not a benchmark: its examples take a few seconds (the
    # bound is loose, for a loaded machine; it catches a budget left at a real run's size)
    assert time.perf_counter() - t0 < 60, f"{rel}: the examples took over 60 s; use smaller budgets"


def test_every_page_is_collected():
    """The collector sees the README and the docs pages and their Python blocks (a broken
    parser must not pass by running nothing)."""
    names = {str(p.relative_to(ROOT)) for p in RUNNABLE}
    assert "README.md" in names
    assert any(n.startswith("docs/") for n in names), names
    readme = python_blocks(ROOT / "README.md")
    assert readme and "mg.fit(" in "".join(b.code for b in readme)


def test_every_fence_names_its_language():
    bare = [f"{p.relative_to(ROOT)}:{b.line - 1}" for p in pages() for b in blocks(p) if not b.lang]
    assert not bare, f"code fences without a language (use ```python, ```bash or ```text): {bare}"


def test_skip_markers_are_few_and_placed():
    skipped = [(p, b) for p in pages() for b in blocks(p) if b.skip]
    where = [f"{p.relative_to(ROOT)}:{b.line - 1}" for p, b in skipped]
    assert len(skipped) <= MAX_SKIPS, f"{len(skipped)} skipped blocks (at most {MAX_SKIPS}): {where}"
    wrong = [w for (p, b), w in zip(skipped, where) if b.lang not in PYTHON_LANGS]
    assert not wrong, f"{SKIP_MARKER} before a block that would not run anyway: {wrong}"
    # a marker must stand right before a fence, else it silently skips nothing
    for p in pages():
        lines = p.read_text(encoding="utf-8").splitlines()
        for i, ln in enumerate(lines):
            if ln.strip() == SKIP_MARKER:
                nxt = next((x for x in lines[i + 1 :] if x.strip()), "")
                assert FENCE.match(nxt), f"{p.relative_to(ROOT)}:{i + 1}: {SKIP_MARKER} not before a fence"


def test_collector_parses_what_it_should(tmp_path):
    """The parser itself: indented fences, longer fences, the skip marker, line numbers."""
    md = tmp_path / "page.md"
    md.write_text(
        textwrap.dedent("""\
        text
        ```python
        a = 1
        ```
        - item

          ```python
          b = a + 1
          ```
        <!-- skip-test -->
        ```python
        raise SystemExit
        ```
        ````text
        ```python
        not code
        ```
        ````
        """),
        encoding="utf-8",
    )
    got = blocks(md)
    assert [(b.lang, b.line, b.skip) for b in got] == [
        ("python", 3, False),
        ("python", 8, False),
        ("python", 12, True),
        ("text", 15, False),
    ]
    assert got[1].code == "b = a + 1\n"
    assert [b.code for b in python_blocks(md)] == ["a = 1\n", "b = a + 1\n"]


if __name__ == "__main__":  # list what would run
    for p in pages():
        for b in blocks(p):
            print(f"{p.relative_to(ROOT)}:{b.line - 1}: {b.lang or '(none)'}{' (skip)' if b.skip else ''}")
