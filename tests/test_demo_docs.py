"""The committed demo results, and the README / docs generated from them (grad_guard.demo.docs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from grad_guard.demo import docs
from grad_guard.demo.experiments import default_experiments
from grad_guard.demo.results import load_results
from grad_guard.demo.settings import DEFAULT_SEEDS, DEFAULT_STEPS, SPREAD_POINTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def committed():
    return load_results(str(ROOT / docs.RESULTS_PATH))


def test_readme_and_results_page_agree_with_the_committed_results():
    assert docs.stale_files(str(ROOT)) == [], (
        "README.md or docs/demo_results.md disagree with docs/demo_results.json; "
        "run `python -m grad_guard.demo.docs --write`"
    )
    assert docs.main(["--check", "--root", str(ROOT)]) == 0


def test_committed_results_are_a_full_demo_of_the_current_rows(committed):
    assert committed.command == "grad-guard demo"
    assert committed.options["steps"] == DEFAULT_STEPS
    assert committed.options["seeds"] == list(range(DEFAULT_SEEDS))
    rows = {exp.name: exp for exp in default_experiments()}
    assert [row.name for row in committed.rows] == list(rows)
    for row in committed.rows:
        assert row.description == rows[row.name].describe()
        assert row.expected == rows[row.name].expected


def test_every_committed_row_shows_its_outcome_for_every_seed(committed):
    for row in committed.rows:
        assert row.robust, (row.name, dict(row.outcomes))
        if row.expected in ("learns", "rescued"):
            assert row.accuracy_spread <= SPREAD_POINTS, (row.name, row.accuracy_spread)


def test_the_readme_shows_the_measured_time(committed):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"in {committed.wall_time_s:.0f} s" in readme


def test_check_fails_when_a_number_moves(tmp_path):
    for name in (docs.README_PATH, docs.PAGE_PATH, docs.RESULTS_PATH):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, tmp_path / name)
    assert docs.stale_files(str(tmp_path)) == []
    data = json.loads((tmp_path / docs.RESULTS_PATH).read_text())
    data["rows"][1]["runs"][0]["accuracy"] -= 0.05
    (tmp_path / docs.RESULTS_PATH).write_text(json.dumps(data))
    assert docs.stale_files(str(tmp_path)) == [docs.README_PATH, docs.PAGE_PATH]
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert docs.main(["--write", "--root", str(tmp_path)]) == 0
    assert docs.stale_files(str(tmp_path)) == []


def test_readme_without_markers_is_refused(committed):
    with pytest.raises(ValueError, match="`readme` must hold the markers"):
        docs.render_readme("# no markers here\n", committed)
