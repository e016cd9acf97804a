"""results/ and the README agree (analysis.results --check), a number changed in the README makes
the check fail, and the seed pooling computes what its docstring says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analysis.results import main
from analysis.seeds import Pooled, bootstrap_interval

ROOT = Path(__file__).resolve().parents[1]


def test_readme_matches_the_records():
    assert main(["--check"]) == 0


def test_a_changed_readme_number_fails_the_check(tmp_path, capsys):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- results:grpo_vs_ppo -->")
    i = text.index("±", start)  # the first pooled number of the table
    j = text.rindex("|", start, i) + 2
    number = text[j:i].strip()
    changed = f"{float(number) + 0.01:+.2f}"
    readme.write_text(text[:j] + changed + " " + text[i:])
    assert main(["--check", "--readme", str(readme)]) == 1
    assert "grpo_vs_ppo: the README's table differs" in capsys.readouterr().err


def test_write_then_check_round_trip(tmp_path):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- results:grpo_vs_ppo -->") + len("<!-- results:grpo_vs_ppo -->")
    end = text.index("<!-- /results:grpo_vs_ppo -->")
    readme.write_text(text[:start] + "\nstale\n" + text[end:])
    assert main(["--check", "--readme", str(readme)]) == 1
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results)
    spec = (results / "experiments.yaml").read_text().replace("figure: docs/figures/grpo_vs_ppo.png", "")
    (results / "experiments.yaml").write_text(spec)
    assert main(["--write", "--readme", str(readme), "--results", str(results)]) == 0
    assert main(["--check", "--readme", str(readme), "--results", str(results)]) == 0


def test_records_are_small_and_versioned():
    for run in (ROOT / "results" / "grpo_vs_ppo").iterdir():
        names = {p.name for p in run.iterdir()}
        assert names <= {"config.yaml", "curves.jsonl", "summary.json"}, names
        assert "versions" in (run / "config.yaml").read_text()  # library versions of the run
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_pooled_numbers_by_hand():
    p = Pooled.of([0.1, 0.3, 0.5])
    assert p.mean == pytest.approx(0.3) and p.std == pytest.approx(0.2)  # sample std
    assert 0.1 <= p.low <= p.mean <= p.high <= 0.5
    assert Pooled.of([0.0, 0.1]).overlaps(Pooled.of([0.05, 0.2]))
    assert not Pooled.of([0.0, 0.01, 0.02]).overlaps(Pooled.of([1.0, 1.01, 1.02]))
    assert bootstrap_interval([2.0]) == (2.0, 2.0)
    assert bootstrap_interval([1.0, 2.0, 3.0]) == bootstrap_interval([1.0, 2.0, 3.0])  # seeded
