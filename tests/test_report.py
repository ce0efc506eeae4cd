"""The study report: every figure and summary file is written, the figures are real images,
and the summary states the analysis' answers with the right numbers -- also when most of
the data are missing."""

from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from minigd.report import PLOT_FILES, make_plots, write_report  # noqa: E402
from minigd.study.analysis import analyze  # noqa: E402
from minigd.study.config import TrialConfig  # noqa: E402

S_MIN, B_CRIT = 100.0, 48.0  # the synthetic steps/examples trade-off
OVERHEAD_S, PER_EXAMPLE_S = 1e-3, 2e-5  # synthetic step time = overhead + per-example cost
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
LRS = [0.01, 0.1, 1.0]  # 0.1 is best, inside the rates tried (a tuned learning rate)
EXPECTED = list(PLOT_FILES) + ["summary.md", "summary.html", "summary.json"]


def _result(B, lr, seed, total_steps=None):
    """A fake run_trial result on the exact trade-off curve (lr 0.1 is best: fewer steps)."""
    steps = round(S_MIN * (1 + B_CRIT / B) * {0.01: 1.5, 0.1: 1.0, 1.0: 1.25}[lr])
    step_time = OVERHEAD_S + PER_EXAMPLE_S * B
    total = total_steps or 2 ** math.ceil(math.log2(2 * steps))  # its half is a probe step
    noise = []
    s = 0
    while True:
        noise.append(
            {"step": s, "examples": s * B, "noise_scale": 20 + 80 * s / total, "trace_cov": 1.0, "grad_norm_sq": 1.0}
        )
        if s >= total:
            break
        s = min(total, max(1, 2 * s))
    acc = 0.97 - 0.002 * math.log2(B)
    return {
        "status": "ok",
        "reached": True,
        "diverged": False,
        "steps_to_target": steps,
        "examples_to_target": steps * B,
        "time_to_target": steps * step_time,
        "steps": total,
        "examples": total * B,
        "train_time": total * step_time,
        "us_per_step": step_time * 1e6,
        "throughput": B / step_time,
        "workspace_bytes": 4096 * B,
        "memory_bytes": 100_000 + 4096 * B,
        "final_train_loss": 0.05,
        "final_val_loss": 0.1 + 0.01 * math.log2(B),
        "final_train_accuracy": acc + 0.01 + 0.001 * math.log2(B),
        "final_val_accuracy": acc,
        "gen_gap_loss": 0.05 + 0.01 * math.log2(B),
        "gen_gap_accuracy": 0.01 + 0.001 * math.log2(B),
        "noise": noise,
        "batch_size": B,
    }


def _rows(sizes=(64, 64, 10), n_failed=2):
    rows = []
    for B in BATCHES:
        for lr in LRS:
            for seed in (0, 1):
                cfg = TrialConfig(sizes=sizes, batch_size=B, lr=lr, seed=seed, target=0.95)
                rows.append((cfg, _result(B, lr, seed)))
    for i in range(n_failed):
        cfg = TrialConfig(sizes=sizes, batch_size=1024, lr=1.0, seed=i)
        rows.append((cfg, {"status": "failed", "error": f"DivergenceError: loss is nan (trial {i})"}))
    return rows


@pytest.fixture(scope="module")
def analysis():
    return analyze(_rows())


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(33)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _check_png(path, *, rich=True):
    import matplotlib.image as mpimg

    w, h = _png_size(path)
    assert w > 100 and h > 100
    img = mpimg.imread(path)
    assert img.shape[0] == h and img.shape[1] == w
    rgb = img[..., :3].reshape(-1, 3)
    assert np.ptp(rgb, axis=0).max() > 0.1, f"{path}: a single flat colour"
    if rich:
        import os

        assert os.path.getsize(path) > 5 * 1024, f"{path}: suspiciously small"
        # a real figure has many distinct colours (lines, markers, shading, text antialiasing)
        q = (rgb * 255).astype(np.uint32)
        assert len(np.unique(q[:, 0] << 16 | q[:, 1] << 8 | q[:, 2])) > 20


def test_synthetic_analysis_has_known_answers(analysis):
    arch = analysis["architectures"][0]
    ans = arch["answers"]
    assert arch["tradeoff_fit"]["b_crit"] == pytest.approx(B_CRIT, rel=2e-2)
    assert ans["fastest_wall_time"] == 64
    assert ans["smallest_reasonable"] == 16
    assert ans["fewest_examples"] == 1
    assert ans["fewest_steps"] == 512
    assert ans["critical_batch_size_noise"] == pytest.approx(60, rel=0.05)


def test_report_writes_every_file_with_real_figures(analysis, tmp_path):
    spec = {"batch_sizes": BATCHES, "lrs": LRS, "seeds": 2}
    paths = write_report(analysis, tmp_path / "report", title="Synthetic study", spec=spec)
    out = tmp_path / "report"
    assert sorted(paths) == sorted(str(out / name) for name in EXPECTED)
    for name in EXPECTED:
        assert (out / name).is_file(), name
    for name in PLOT_FILES:
        _check_png(out / name)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"

    md = (out / "summary.md").read_text(encoding="utf-8")
    page = (out / "summary.html").read_text(encoding="utf-8")
    arch = analysis["architectures"][0]
    rows = {r["batch_size"]: r for r in arch["per_batch"]}
    t64 = rows[64]["time_to_target"]
    assert "not enough data" not in md  # no placeholder figure
    assert "# Synthetic study" in md
    assert f"Fastest to 95% validation accuracy in wall-clock time:** batch 64 ({t64:.3g} s" in md
    assert "Fewest examples to target:** batch 1 (" + f"{int(rows[1]['examples_to_target']):,}" + " examples" in md
    assert f"Fewest steps to target:** batch 512 ({int(rows[512]['steps_to_target']):,} steps" in md
    assert "Critical batch size:** ≈ 48 from the fitted steps/examples trade-off" in md
    assert "S_min = 100 steps" in md and "E_min = 4,800 examples" in md
    m = re.search(r"B_simple measured mid-training is ≈ ([0-9.]+)", md)
    assert m and float(m.group(1)) == pytest.approx(arch["noise_scale"]["middle"], rel=0.01)
    assert "arXiv:2505.23971" in md and "arXiv:1812.06162" in md
    assert "Smallest reasonable batch size:** batch 16 (" + f"{rows[16]['time_to_target']:.3g} s" in md
    assert "within 2× the best measured wall-clock time" in md
    assert "Regimes:** perfect scaling up to B ≈ 16" in md
    assert "diminishing returns between ≈ 16 and ≈ 144" in md and "no benefit from B ≈ 144" in md
    assert "Is a batch size below 32 ever reasonable here?** Yes: batch 16" in md
    assert "Generalisation:** best final validation accuracy 97.0% at batch 1" in md
    assert "Highest goodput" in md
    # the per-batch table: one row per batch size, with its regime
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(BATCHES)
    assert table[0].startswith("| batch | best lr |")
    row64 = next(ln for ln in table if ln.startswith("| 64 |"))
    assert "| 0.1 |" in row64 and "diminishing returns" in row64 and f"{int(rows[64]['steps_to_target']):,}" in row64
    assert next(ln for ln in table if ln.startswith("| 512 |")).rstrip(" |").endswith("no benefit")
    # appendix: failures and the spec
    assert "2 of 62 trials failed" in md
    assert "DivergenceError: loss is nan (trial 0)" in md
    assert '"seeds": 2' in md
    # same content in the HTML, images by relative path
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    for name in PLOT_FILES:
        assert f'<img src="{name}"' in page and f"]({name})" in md
    assert "batch 64" in page and "≈ 48" in page and "DivergenceError" in page


def test_several_architectures_one_series_each(tmp_path):
    rows = _rows(sizes=(64, 64, 10)) + _rows(sizes=(64, 128, 10), n_failed=0)
    analysis = analyze(rows)
    assert len(analysis["architectures"]) == 2
    paths = write_report(analysis, tmp_path)
    assert len(paths) == len(EXPECTED)
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "not enough data" not in md  # no placeholder figure
    assert "## Architecture 64-64-10 relu sgd" in md and "## Architecture 64-128-10 relu sgd" in md
    _check_png(tmp_path / "steps_examples.png")


def _sparse_analysis():
    """Mostly None: nothing reached the target, nothing measured, a failed fit."""
    keys = [
        "best_lr",
        "reached_fraction",
        "steps_to_target",
        "examples_to_target",
        "time_to_target",
        "final_val_accuracy",
        "final_val_loss",
        "final_train_loss",
        "gen_gap_accuracy",
        "gen_gap_loss",
        "throughput",
        "us_per_step",
        "memory_bytes",
        "workspace_bytes",
        "noise_scale_start",
        "noise_scale_middle",
        "noise_scale_end",
        "regime",
        "statistical_efficiency",
        "goodput",
    ]
    per_batch = [
        dict(
            {k: None for k in keys},
            batch_size=b,
            full_batch=False,
            lrs_tried=[],
            noise_curves=[None, []],
            lr_results={},
        )
        for b in (8, 32, 128)
    ]
    per_batch[1]["final_val_loss"] = float("nan")
    per_batch[2]["throughput"] = float("inf")
    arch = {
        "sizes": [64, 10],
        "activation": "relu",
        "optimizer": "sgd",
        "target_metric": "val_accuracy",
        "target": 0.95,
        "per_batch": per_batch,
        "tradeoff_fit": {"error": "fewer than 3 points"},
        "noise_scale": {"start": None, "middle": None, "end": None},
        "answers": {
            k: None
            for k in (
                "fastest_wall_time",
                "fewest_examples",
                "fewest_steps",
                "max_goodput",
                "critical_batch_size_fit",
                "critical_batch_size_noise",
                "smallest_reasonable",
                "smallest_reaching_target",
                "best_final_validation",
            )
        },
    }
    empty_arch = {"per_batch": [], "tradeoff_fit": None, "answers": None, "noise_scale": None}
    return {
        "n_trials": 5,
        "n_failed": 2,
        "failures": [{"trial": "B=8", "error": None}, {}],
        "architectures": [arch, empty_arch],
    }


_UNRESOLVED = {
    "n_trials": 3,
    "n_failed": 0,
    "failures": [],
    "architectures": [
        {
            "sizes": [4, 2],
            "target_metric": "val_loss",
            "target": 0.1,
            # a fit that cannot resolve B_crit (perfect scaling everywhere): b_crit = inf, s_min = 0
            "tradeoff_fit": {"s_min": 0.0, "e_min": 300.0, "b_crit": float("inf"), "residual": 0.0},
            "per_batch": [
                {
                    "batch_size": b,
                    "steps_to_target": 300 / b,
                    "examples_to_target": 300,
                    "time_to_target": 1.0 / b,
                    "final_val_loss": 0.09,
                    "regime": "unknown",
                }
                for b in (1, 2, 4)
            ],
            "answers": {"fastest_wall_time": 4, "smallest_reasonable": 2},
        }
    ],
}


@pytest.mark.parametrize(
    "analysis_in, expected",
    [
        (_sparse_analysis(), "Critical batch size:** not measured"),
        ({}, "No successful trials"),
        ({"n_trials": 0, "n_failed": 0, "failures": [], "architectures": []}, "No successful trials"),
        (_UNRESOLVED, "Critical batch size:** above the largest batch size swept (4)"),
    ],
    ids=["mostly-none", "empty-dict", "no-architectures", "unresolved-fit"],
)
def test_missing_data_still_writes_every_file(analysis_in, expected, tmp_path):
    paths = write_report(analysis_in, tmp_path)
    assert sorted(paths) == sorted(str(tmp_path / n) for n in EXPECTED)
    for name in PLOT_FILES:
        _check_png(tmp_path / name, rich=False)
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert (tmp_path / "summary.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "Appendix" in md and expected in md


def test_mostly_none_summary_is_honest(tmp_path):
    results = make_plots(_sparse_analysis(), tmp_path)
    by_name = {r.name: r.placeholder for r in results}
    assert by_name["steps_examples.png"].startswith("not enough data:")
    assert by_name["noise_scale.png"].startswith("not enough data:")
    write_report(_sparse_analysis(), tmp_path, spec=None)
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "Fastest to 95% validation accuracy in wall-clock time:** not reached" in md
    assert "Critical batch size:** not measured — the steps/examples trade-off fit failed (fewer than 3 points)" in md
    assert "B_simple was not measured" in md
    assert "Regimes:** not determined" in md
    assert "Is a batch size below 32 ever reasonable here?** Cannot tell" in md
    assert "2 of 5 trials failed" in md
    assert "not enough data:" in md  # the placeholder figures are named as such
    table_row = next(ln for ln in md.splitlines() if ln.startswith("| 8 |"))
    assert "not reached" in table_row and "not measured" in table_row


def test_missing_matplotlib_message(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'minigd\[study\]'"):
        write_report({}, tmp_path)


# -- the "Generalisation" answer ----------------------------------------------------------------


def test_rank_correlation_uses_average_ranks_for_ties():
    from scipy.stats import spearmanr

    from minigd.report.summary import _spearman

    rng = np.random.default_rng(0)
    for _ in range(100):
        x, y = rng.integers(0, 4, 9), rng.integers(0, 3, 9)
        want = spearmanr(x, y).statistic
        got = _spearman(x, y)
        assert (got is None and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)
    # identical values at every batch size: undefined, not +1.00 (ties broken by position were)
    assert _spearman([1, 8, 64, 1437], [0.955, 0.955, 0.955, 0.955]) is None
    assert _spearman([1, 8, 64, 1437], [0.9, 0.9, 0.9, 0.95]) == pytest.approx(0.7745966692)


def test_generalisation_with_identical_accuracies_reports_no_trend():
    from minigd.report.summary import answer_generalisation

    rows = []
    for B in (1, 8, 64, 1437):
        for seed in (0, 1):
            res = dict(
                _result(B, 0.1, seed),
                final_val_accuracy=0.9554317548746518,
                final_train_accuracy=0.97,
                gen_gap_accuracy=0.97 - 0.9554317548746518,
            )
            rows.append((TrialConfig(batch_size=B, lr=0.1, seed=seed, target=0.95), res))
    text = answer_generalisation(analyze(rows)["architectures"][0], True)
    assert "95.5% at every batch size: no trend" in text
    assert "rank correlation" not in text and "+1.00" not in text and "tends to get" not in text
    assert "at each trial's stopping point" in text  # says what it measures


def test_generalisation_answer_says_values_are_at_the_stopping_point(analysis, tmp_path):
    write_report(analysis, tmp_path)
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    para = next(ln for ln in md.splitlines() if "**Generalisation:**" in ln)
    assert "Spearman rank correlation with batch size -1.00" in para  # accuracy falls with log2(B)
    assert "stopping point" in para and "not how well each batch size generalises" in para


# -- "Your questions, answered" -----------------------------------------------------------------


def _question_answers():
    """Answers as the arms of minigd.study.questions write them: one with a figure that the
    report draws, one whose figure is missing, one not answered -- given out of order."""
    return {
        "sgd_batch_one": {
            "name": "sgd_batch_one",
            "question": 'Does "SGD" mean batch size 1?',
            "answer": "No: SGD is the update rule. Here batch 1 takes 6.6x the fastest mini-batch's time.",
            "value": 0.0227,
            "lo": 0.0168,
            "hi": 0.0309,
            "unit": "s (batch 1's wall time to the target)",
            "conditions": "MLP 64-64-10 on digits; target val_accuracy >= 0.95; one thread",
            "plot": "q_sgd_batch_one_missing.png",
            "details": {},
        },
        "width_one": {
            "name": "width_one",
            "question": "Should a search space allow a hidden layer of width 1?",
            "answer": "Not answered: too few trials reached the target",
            "value": None,
            "lo": None,
            "hi": None,
            "unit": None,
            "conditions": "",
            "plot": None,
            "details": {},
        },
        "smallest_batch": {
            "name": "smallest_batch",
            "question": "Is a batch size below 32 ever reasonable? What is the smallest reasonable batch size?",
            "answer": "A batch size below 32 is reasonable here: batch 16 reaches the target within 2x.",
            "value": 16,
            "lo": 8,
            "hi": 32,
            "wins": 0.87,
            "unit": "examples per batch",
            "conditions": "MLP 64-64-10 on digits; tolerance 2x",
            "plot": "time_to_target.png",
            "details": {},
        },
    }


def _section(text, start, end):
    i = text.index(start)
    j = text.index(end, i)
    return text[i:j]


def test_questions_section_in_markdown_and_html(analysis, tmp_path):
    write_report(dict(analysis, questions=_question_answers()), tmp_path, title="Q")
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    page = (tmp_path / "summary.html").read_text(encoding="utf-8")
    # right after the answers (and before the figures), in the order of QUESTIONS
    assert (
        md.index("**Recommendation:**")
        < md.index("## Answers")
        < md.index("## Your questions, answered")
        < md.index("## Figures")
    )
    sec = _section(md, "## Your questions, answered", "## Figures")
    heads = [ln for ln in sec.splitlines() if ln.startswith("### ")]
    assert heads == [
        "### Is a batch size below 32 ever reasonable? What is the smallest reasonable batch size?",
        '### Does "SGD" mean batch size 1?',
        "### Should a search space allow a hidden layer of width 1?",
    ]
    # each answered question: its sentence, its number with the interval and unit, win rate, conditions
    assert "batch 16 reaches the target within 2x" in sec
    assert "16 [8, 32] examples per batch; won in 87% of bootstrap resamples" in sec
    assert "0.0227 [0.0168, 0.0309] s (batch 1's wall time to the target)" in sec
    assert "<sub>Conditions: MLP 64-64-10 on digits; tolerance 2x</sub>" in sec
    assert "Not answered: too few trials reached the target" in sec
    # the figure that exists is shown, the missing one is not
    assert "](time_to_target.png)" in sec and "q_sgd_batch_one_missing.png" not in md
    hsec = _section(page, '<section id="your-questions">', "</section>")
    assert "<h2>Your questions, answered</h2>" in hsec
    assert re.findall(r"<h3>(.*?)</h3>", hsec) == [h[4:] for h in heads]
    assert "16 [8, 32] examples per batch; won in 87% of bootstrap resamples" in hsec
    assert "0.0227 [0.0168, 0.0309]" in hsec
    assert '<p class="small"><small>Conditions: MLP 64-64-10 on digits; tolerance 2x</small></p>' in hsec
    imgs = re.findall(r"<img [^>]*>", hsec)
    assert len(imgs) == 1 and 'src="time_to_target.png"' in imgs[0]
    assert re.search(r'alt="figure for the question: Is a batch size below 32[^"]*"', imgs[0])
    assert "max-width:100%" in imgs[0]
    assert "q_sgd_batch_one_missing.png" not in page
    # an unanswered question shows no headline number
    width_one = hsec[hsec.index("hidden layer of width 1") :]
    assert "Headline number" not in width_one and "Not answered: too few trials" in width_one


def _pages(analysis, report_dir):
    """summary.md and summary.html of ``analysis`` without drawing the figures."""
    from minigd.report.summary import build_blocks, render_html, render_markdown

    blocks = build_blocks(analysis, report_dir=report_dir)
    return render_markdown(blocks), render_html(blocks)


def test_no_questions_no_section(analysis, tmp_path):
    for questions in (None, {}, {"smallest_batch": "not a dict"}):
        md, page = _pages(dict(analysis, questions=questions), tmp_path)
        assert "Your questions, answered" not in md
        assert '<section id="your-questions"' not in page


def test_questions_section_escapes_html(analysis, tmp_path):
    evil = "<script>alert(1)</script> & <img src=x onerror=alert(2)>"
    q = {
        "smallest_batch": {
            "name": "smallest_batch",
            "question": f"Q {evil}?",
            "answer": f"A {evil}.",
            "value": 1,
            "lo": 0,
            "hi": 2,
            "unit": f"u {evil}",
            "conditions": f"C {evil}",
            "plot": "../secret.png",
            "details": {},
        },
        "sgd_batch_one": {
            "name": "sgd_batch_one",
            "question": "Q2",
            "answer": "A2",
            "value": 1,
            "lo": 1,
            "hi": 1,
            "unit": "s",
            "conditions": "",
            "plot": '"><script>x</script>.png',
            "details": {},
        },
    }
    (tmp_path / "secret.png").write_bytes(b"not in the report directory")
    out = tmp_path / "report"
    out.mkdir()
    md, page = _pages(dict(analysis, questions=q), out)
    hsec = _section(page, '<section id="your-questions">', "</section>")
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(2)&gt;" in hsec
    assert hsec.count("&lt;script&gt;alert(1)") == 4  # question, answer, unit, conditions
    assert "<img" not in hsec  # neither plot names a file here
    assert "<sub>Conditions: C &lt;script>alert(1)&lt;/script> &amp; &lt;img" in md


def test_question_plot_must_exist_in_the_report_directory(tmp_path):
    from minigd.report.summary import question_blocks

    (tmp_path / "q_width_one.png").write_bytes(b"png")
    base = {"question": "Q", "answer": "A", "value": 1.5, "lo": 1.0, "hi": 2.0, "unit": "x", "conditions": "c"}
    flat = lambda blocks: [b for s in blocks for b in s[2]]  # noqa: E731
    imgs = lambda q, d: [b for b in flat(question_blocks({"width_one": q}, d)) if b[0] == "img"]  # noqa: E731
    assert [b[1] for b in imgs(dict(base, plot="q_width_one.png"), tmp_path)] == ["q_width_one.png"]
    assert imgs(dict(base, plot="q_width_one.png"), None) == []  # nowhere to look
    assert imgs(dict(base, plot="nope.png"), tmp_path) == []
    assert imgs(dict(base, plot=None), tmp_path) == []
    assert imgs(dict(base, plot=str(tmp_path / "q_width_one.png")), tmp_path) == []  # a path, not a name
    assert question_blocks({}, tmp_path) == [] and question_blocks(None, tmp_path) == []


def test_question_headline_formats():
    from minigd.report.summary import question_headline

    assert (
        question_headline({"value": 16, "lo": 8, "hi": 32, "unit": "examples", "wins": 0.5})
        == "16 [8, 32] examples; won in 50% of bootstrap resamples"
    )
    assert question_headline({"value": 0.4213, "lo": None, "hi": None, "unit": "%"}) == "0.421 %"
    assert question_headline({"value": 1234.5, "lo": 1000, "hi": float("inf"), "unit": None}) == "1,234 [1,000, ∞]"
    assert question_headline({"value": None, "lo": 1, "hi": 2}) == ""


# -- the figures: legends outside the data, axes labelled, log axes say so ------------------------


def test_figures_keep_legends_off_the_data_and_label_their_axes(analysis, tmp_path, monkeypatch):
    """Every figure of a full report is checked as drawn (before it is saved): no legend
    overlaps any axes' data area, every axis has a label with its unit in brackets, and an
    axis on a log scale says so in its label."""
    from minigd.report import plots

    figs = {}
    real_save = plots._save

    def keep(fig, path, description=""):
        real_save(fig, path, description)  # lays the figure out as written, then measure it
        axes = [ax for ax in fig.axes if ax.axison]
        legends = [lg for lg in fig.legends] + [ax.get_legend() for ax in axes if ax.get_legend()]
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        r = FigureCanvasAgg(fig).get_renderer()  # (_save closed the figure: its own canvas is gone)
        figs[path.rsplit("/", 1)[-1]] = [
            (
                ax.get_xlabel(),
                ax.get_xscale(),
                ax.get_ylabel(),
                ax.get_yscale(),
                [lg.get_window_extent(r).overlaps(ax.get_window_extent(r)) for lg in legends],
                [lg.get_window_extent(r).x1 <= fig.bbox.x1 + 1 and lg.get_window_extent(r).x0 >= -1 for lg in legends],
            )
            for ax in axes
        ]

    monkeypatch.setattr(plots, "_save", keep)
    rows = _rows(sizes=(64, 64, 10)) + _rows(sizes=(64, 128, 10), n_failed=0)
    for name, a in (("one", analysis), ("two", analyze(rows))):
        figs.clear()
        make_plots(a, tmp_path)
        assert sorted(figs) == sorted(PLOT_FILES), name
        for fname, axes in figs.items():
            assert axes, fname
            for xl, xs, yl, ys, overlaps, inside in axes:
                where = f"{name}/{fname}: {xl!r} / {yl!r}"
                assert not any(overlaps), f"{where}: a legend covers the data area"
                assert all(inside), f"{where}: a legend is cut off by the figure's edge"
                for label, scale in ((xl, xs), (yl, ys)):
                    assert label and "(" in label, f"{where}: an axis without a label and unit"
                    assert (scale == "log") == ("log" in label), f"{where}: {label!r} on a {scale} axis"
