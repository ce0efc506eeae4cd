"""summary.html opened in a real browser: headless Chromium from the OS packages.

A small real study (digits, batch sizes 8 and 64, two questions answered) writes its report;
Chromium opens ``summary.html`` at a 1280- and an 800-pixel-wide window and the test checks
that every ``<img>`` loaded (``naturalWidth > 0``), that nothing was logged as an error (no
console error, no uncaught exception, no failed load), and that the recommendation paragraph
and the section "Your questions, answered" are visible without scrolling sideways
(``document.scrollingElement.scrollWidth <= window.innerWidth``, and both lie inside the
window).

How Chromium is driven: through the Chrome DevTools Protocol over a pipe, with the standard
library only -- no Playwright, no websocket package, no port.  Chromium started with
``--remote-debugging-pipe`` reads protocol commands (JSON, each ended by a NUL byte) from
its file descriptor 3 and writes replies and events to its descriptor 4 (what Playwright and
Puppeteer use underneath).  :class:`CDP` opens a page, sets the window size
(``Emulation.setDeviceMetricsOverride``), navigates, waits for ``Page.loadEventFired``,
collects ``Runtime.consoleAPICalled`` / ``Runtime.exceptionThrown`` / ``Log.entryAdded`` /
``Network.loadingFailed`` events and measures the page with ``Runtime.evaluate``.  A second
test feeds the same checks a page that breaks each rule (a missing image, a console error,
a too-wide element), so the checks are known to see what they look for.

Which browser: ``$MINIGD_CHROMIUM`` if set, else the first of ``chromium``,
``chromium-browser``, ``google-chrome``, ``google-chrome-stable`` on ``PATH``
(Debian/Ubuntu: ``apt-get install chromium``).  Without one the tests skip, saying so.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTHS = (1280, 800)


def find_chromium():
    """The Chromium executable to use, or None."""
    env = os.environ.get("MINIGD_CHROMIUM")
    if env:
        return shutil.which(env) or (env if os.access(env, os.X_OK) else None)
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


class CDPError(RuntimeError):
    pass


class CDP:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``.

    ``call(method, params, session)`` sends one command and returns its result; every event
    that arrives meanwhile is kept in ``events`` (a list of the raw messages)."""

    def __init__(self, exe: str, profile_dir: str, timeout: float = 60.0):
        self.timeout = timeout
        self.events: list = []
        self._next = 0
        self._buf = b""
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # the browser's ends, moved to descriptors >= 10 (close-on-exec) so that placing them
        # at 3 and 4 in the child can never clobber one with the other
        r3 = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        w4 = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        args = [
            exe,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--mute-audio",
            "--hide-scrollbars",
            f"--user-data-dir={profile_dir}",
            "about:blank",
        ]
        log = os.open(os.path.join(profile_dir, "chromium-stderr.log"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # posix_spawn's file actions place the pipe ends at 3 and 4 (dup2 leaves the copies
            # inheritable); no shell, no preexec_fn
            self.pid = os.posix_spawn(
                exe,
                args,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, null, 0),
                    (os.POSIX_SPAWN_DUP2, log, 1),
                    (os.POSIX_SPAWN_DUP2, log, 2),
                    (os.POSIX_SPAWN_DUP2, r3, 3),
                    (os.POSIX_SPAWN_DUP2, w4, 4),
                ],
            )
        finally:
            for fd in (r3, w4, log, null):
                os.close(fd)
        self.returncode = None
        self._w, self._r = to_browser_w, from_browser_r

    def poll(self):
        """The browser's exit code, or None while it runs."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    # -- transport
    def _read_message(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError("no answer from Chromium in time")
            ready, _, _ = select.select([self._r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise CDPError(f"Chromium closed the pipe (exit code {self.poll()})")
                self._buf += chunk
            elif self.poll() is not None:
                raise CDPError(f"Chromium exited with code {self.returncode}")
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, params=None, session=None):
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._next:
                if "error" in m:
                    raise CDPError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def wait_event(self, method, session=None, since=0):
        """The first event ``method`` (of ``session``) at index >= ``since`` of ``events``."""
        deadline = time.monotonic() + self.timeout
        i = since
        while True:
            for ev in self.events[i:]:
                if ev.get("method") == method and (session is None or ev.get("sessionId") == session):
                    return ev
            i = len(self.events)
            m = self._read_message(deadline)
            if "method" in m:
                self.events.append(m)

    def close(self):
        try:
            self.call("Browser.close")
        except (CDPError, OSError):
            pass
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


# the measurements, taken in the page
_MEASURE = r"""
(async () => {
  await Promise.all([...document.images].map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  const w = window.innerWidth;
  const box = el => { if (!el) return null; const r = el.getBoundingClientRect();
      return {left: r.left, right: r.right, width: r.width, height: r.height}; };
  // elements sticking out of the window on the right (inside a box that scrolls by itself
  // -- a wide table -- is fine: the page does not scroll sideways for it)
  const sticking = root => !root ? [] : [root, ...root.querySelectorAll('*')]
      .filter(e => e.getBoundingClientRect().right > w + 0.5 || e.getBoundingClientRect().left < -0.5)
      .filter(e => !e.closest('.table-wrap'))
      .map(e => e.tagName + (e.id ? '#' + e.id : ''));
  const rec = [...document.querySelectorAll('p')]
      .find(p => p.textContent.trim().startsWith('Recommendation:')) || null;
  const sec = document.getElementById('your-questions');
  return {
    innerWidth: w,
    scrollWidth: document.scrollingElement.scrollWidth,
    images: [...document.images].map(i => ({src: i.getAttribute('src'), alt: i.alt,
        complete: i.complete, naturalWidth: i.naturalWidth, box: box(i)})),
    recommendation: box(rec), recommendationText: rec ? rec.textContent.slice(0, 80) : null,
    section: box(sec),
    sectionTitle: sec && sec.querySelector('h2') ? sec.querySelector('h2').textContent : null,
    questions: sec ? [...sec.querySelectorAll('h3')].map(h => h.textContent) : [],
    sticking: sticking(rec).concat(sticking(sec)),
  };
})()
"""


def _errors(events, session):
    """Error messages among the events of ``session``: console errors, uncaught exceptions,
    error log entries (a failed image load among them) and failed network loads."""
    out = []
    for ev in events:
        if ev.get("sessionId") != session:
            continue
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(
                "console."
                + p["type"]
                + ": "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            )
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str((d.get("exception") or {}).get("description") or d.get("text")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            out.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".strip())
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"load failed: {p.get('errorText')} ({p.get('type')})")
    return out


def open_page(cdp: CDP, path: Path, width: int, height: int = 900) -> dict:
    """Open ``path`` in a new page ``width`` pixels wide; returns the measurements of
    :data:`_MEASURE` plus ``"errors"``."""
    target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    sid = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            cdp.call(method, session=sid)
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            sid,
        )
        since = len(cdp.events)
        nav = cdp.call("Page.navigate", {"url": path.resolve().as_uri()}, sid)
        assert not nav.get("errorText"), nav
        cdp.wait_event("Page.loadEventFired", sid, since)
        res = cdp.call("Runtime.evaluate", {"expression": _MEASURE, "awaitPromise": True, "returnByValue": True}, sid)
        if "exceptionDetails" in res:
            raise CDPError(f"measuring the page failed: {res['exceptionDetails']}")
        out = res["result"]["value"]
        out["errors"] = _errors(cdp.events, sid)
        return out
    finally:
        cdp.call("Target.closeTarget", {"targetId": target})


def problems(m: dict) -> list:
    """What is wrong with a page's measurements ``m`` (an empty list: nothing)."""
    out = []
    w = m["innerWidth"]
    if m["scrollWidth"] > w:
        out.append(f"the page scrolls sideways: scrollWidth {m['scrollWidth']} > innerWidth {w}")
    for img in m["images"]:
        if not img["complete"] or img["naturalWidth"] <= 0:
            out.append(f"image {img['src']!r} did not load")
        elif img["box"]["right"] > w + 0.5:
            out.append(f"image {img['src']!r} is wider than the window ({img['box']['right']:.0f} > {w})")
        if not img["alt"]:
            out.append(f"image {img['src']!r} has no alt text")
    for name in ("recommendation", "section"):
        b = m[name]
        if b is None:
            out.append(f"no {name} on the page")
        elif b["width"] <= 0 or b["height"] <= 0 or b["left"] < -0.5 or b["right"] > w + 0.5:
            out.append(f"the {name} is not inside the window: {b}")
    if m["sticking"]:
        out.append(f"elements stick out of the window: {m['sticking'][:5]}")
    out += [f"error: {e}" for e in m["errors"]]
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "no Chromium installed (looked for $MINIGD_CHROMIUM, "
            + ", ".join(BROWSERS)
            + " on PATH; Debian/Ubuntu: apt-get install chromium)"
        )
    profile = tmp_path_factory.mktemp("chromium-profile")
    try:
        cdp = CDP(exe, str(profile))
        cdp.call("Browser.getVersion")
    except (CDPError, OSError) as exc:
        log = profile / "chromium-stderr.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        pytest.fail(f"{exe} is installed but could not be driven over --remote-debugging-pipe: {exc}\n{tail}")
    yield cdp
    cdp.close()


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """The report of a small real study that answers two questions."""
    from minigd.report import write_report
    from minigd.study import SweepSpec, run_study

    out = tmp_path_factory.mktemp("browser-study")
    spec = SweepSpec(
        batch_sizes=(8, 64), lr_grid=(0.5, 1, 2), n_seeds=2, widths=(16,), max_epochs=6, target=0.9, lr_extend=0
    )
    run_study(spec, out, workers=1, questions=("smallest_batch", "sgd_batch_one"), report=write_report)
    return out / "report"


@pytest.mark.parametrize("width", WIDTHS)
def test_summary_html_in_chromium(browser, real_report, width):
    page = real_report / "summary.html"
    summary = json.loads((real_report / "summary.json").read_text())
    m = open_page(browser, page, width)
    assert problems(m) == [], f"summary.html at {width} px wide"
    assert m["images"], "the report shows no figure"
    assert m["sectionTitle"] == "Your questions, answered"
    asked = [q["question"] for q in summary["questions"].values()]
    assert m["questions"] == asked and len(asked) == 2
    # each answered question's figure is on the page (and loaded: problems() checked that)
    srcs = {img["src"] for img in m["images"]}
    for q in summary["questions"].values():
        if q.get("plot") and (real_report / q["plot"]).is_file():
            assert q["plot"] in srcs


def test_the_checks_see_what_they_look_for(browser, tmp_path):
    """A page that breaks every rule: a missing image, a console error, an uncaught
    exception and an element wider than the window -- each must be reported."""
    import base64

    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    (tmp_path / "ok.png").write_bytes(png)
    (tmp_path / "bad.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        "<p><strong>Recommendation:</strong> use batch 8.</p>"
        "<section id='your-questions'><h2>Your questions, answered</h2><h3>Q?</h3>"
        "<div style='width:3000px'>too wide</div></section>"
        "<img src='ok.png' alt='fine'><img src='missing.png' alt='missing'>"
        "<script>console.error('boom'); null.x;</script></body></html>",
        encoding="utf-8",
    )
    found = "\n".join(problems(open_page(browser, tmp_path / "bad.html", 800)))
    assert "scrolls sideways" in found
    assert "'missing.png' did not load" in found and "'ok.png'" not in found
    assert "console.error: boom" in found
    assert "exception: TypeError" in found
    assert "elements stick out of the window: ['DIV']" in found
    assert "error: log (network): Failed to load resource" in found
