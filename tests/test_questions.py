"""`minigd study --questions`: the framework and the arms' mechanics on tiny budgets."""

from __future__ import annotations

import json

import pytest

from minigd.report import write_report
from minigd.study import ResultStore, SweepSpec, run_study
from minigd.study.questions import QUESTIONS, parse_questions


def test_parse_questions():
    assert parse_questions("all") == QUESTIONS
    assert parse_questions("width_one,smallest_batch") == ("smallest_batch", "width_one")
    assert parse_questions(None) == ()
    for bad in ("nosuch", "width_one,nosuch", ","):
        with pytest.raises(ValueError, match="questions"):
            parse_questions(bad)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    spec = SweepSpec(
        batch_sizes=(4, 32, 256),
        lr_grid=(0.5, 1.0, 2.0),
        n_seeds=2,
        widths=(16,),
        max_epochs=8,
        target=0.9,
        lr_extend=0,
    )
    res = run_study(spec, out, workers=1, questions=("smallest_batch", "sgd_batch_one"), report=write_report)
    return out, spec, res


def test_analysis_only_questions_are_answered_and_reproduced_by_report(tiny_study, capsys):
    out, spec, res = tiny_study
    q = res["analysis"]["questions"]
    assert set(q) == {"smallest_batch", "sgd_batch_one"}
    sb = q["smallest_batch"]
    assert sb["value"] in (4, 32, 256) and sb["lo"] <= sb["value"] <= sb["hi"]
    assert "below 32" in sb["answer"] and sb["conditions"]
    assert q["sgd_batch_one"]["answer"].startswith("No:")
    with open(out / "report" / "summary.json") as f:
        assert json.load(f)["questions"]["smallest_batch"]["value"] == sb["value"]
    with ResultStore(out / "results.sqlite") as store:
        assert set(store.meta("question_keys")) == {"smallest_batch", "sgd_batch_one"}
    from minigd.cli import main

    assert main(["report", str(out), "--out", str(out / "again")]) == 0
    with open(out / "again" / "summary.json") as f:
        assert json.load(f)["questions"] == json.loads(json.dumps(q))


def test_cli_refuses_unknown_questions(tmp_path, capsys):
    from minigd.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", "--questions", "nosuch", "--out", str(tmp_path / "s")])
    assert e.value.code == 2 and "--questions" in capsys.readouterr().err
