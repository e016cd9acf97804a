"""Tests of analysis/composite.py on tiny synthetic composite-reward run directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analysis.composite import (
    composite_table,
    load_composite,
    main,
    nm_path_table,
    plot_composite,
)
from analysis.load import MalformedLineWarning

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = ["sentiment", "fluency"]


def _write_run(
    root: Path,
    name: str,
    method: str,
    points: list[tuple[int, float, list[float]]],
    extra: dict[str, Any] | None = None,
    per_row: list[dict[str, Any]] | None = None,
) -> Path:
    """A run dir whose curves.jsonl has one row per (step, gold, component_scores)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"method: {method}\n", encoding="utf-8")
    lines = []
    for i, (step, gold, comps) in enumerate(points):
        row: dict[str, Any] = {
            "method": method,
            "step": step,
            "kl": 0.5 * step,
            "sqrt_kl": (0.5 * step) ** 0.5,
            "proxy_score": sum(comps) / len(comps),
            "proxy_member_scores": comps,
            "gold_score": gold,
            "gold_stderr": 0.01,
            "component_names": NAMES,
            "component_scores": comps,
            "gold_components": [0.0, 0.0],
            "reward_weights": [0.5, 0.5],
        }
        row.update(extra or {})
        if per_row is not None:
            row.update(per_row[i])
        lines.append(json.dumps(row))
    (run / "curves.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run


def _constrained(root: Path, name: str = "con") -> Path:
    # step-0 point (0, 0) -> default reference (-1, -1); final point (1, 2) -> HV 2 * 3 = 6.
    return _write_run(
        root,
        name,
        "constrained_ppo",
        [(0, 0.1, [0.0, 0.0]), (10, 0.7, [0.5, 1.0]), (20, 0.4, [1.0, 2.0])],
        extra={"constraint": "inequality", "thresholds": [0.8, 1.5], "constraint_names": NAMES},
        per_row=[
            {"lagrange_multipliers": [0.5, 0.5]},
            {"lagrange_multipliers": [0.6, 0.4]},
            {"lagrange_multipliers": [0.9, 0.25]},
        ],
    )


def _dynamic(root: Path, name: str = "dyn", final: list[float] | None = None) -> Path:
    return _write_run(
        root,
        name,
        "dynamic_ppo",
        [(0, 0.1, [0.0, 0.0]), (10, 0.3, final or [2.0, 0.5])],
        extra={"weighting": "gradient", "hypervolume": 1.0, "reward_scale": 1.0},
        per_row=[{"reward_weights": [0.5, 0.5]}, {"reward_weights": [0.75, 0.25]}],
    )


def _nm(root: Path) -> Path:
    run = _write_run(
        root,
        "nmrun",
        "nm_ppo",
        [(0, 0.1, [0.0, 0.0]), (10, 0.2, [0.2, 0.3]), (20, 0.5, [0.4, 0.1])],
        extra={"constraint": "inequality", "lagrange_multipliers": [0.5, 0.5]},
        per_row=[{"thresholds": [0.0, 0.0]}, {"thresholds": [0.0, 0.0]}, {"thresholds": [0.5, 0.0]}],
    )
    path = [
        {"evaluation": 0, "step": 10, "phase": "search", "thresholds": [0.0, 0.0], "gold_score": 0.2,
         "constraint_values": [0.2, 0.3], "lagrange_multipliers": [0.45, 0.35]},
        {"evaluation": 1, "step": 20, "phase": "search", "thresholds": [0.5, 0.0], "gold_score": 0.5,
         "constraint_values": [0.4, 0.1], "lagrange_multipliers": [0.6, 0.2]},
    ]
    (run / "nm_path.jsonl").write_text("".join(json.dumps(r) + "\n" for r in path), encoding="utf-8")
    return run


def _table_rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| run "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


# ---------------------------------------------------------------- loading


def test_load_composite_reads_arrays(tmp_path: Path) -> None:
    run = load_composite(_constrained(tmp_path))
    assert run.name == "con"
    assert run.method == "constrained_ppo"
    assert run.mode == "inequality"
    assert run.component_names == NAMES
    assert run.steps.tolist() == [0, 10, 20]
    assert run.components.shape == (3, 2)
    assert run.thresholds is not None and run.thresholds.shape == (3, 2)
    assert run.multipliers is not None and run.multipliers[-1].tolist() == [0.9, 0.25]
    assert run.nm_path is None
    dyn = load_composite(_dynamic(tmp_path))
    assert dyn.mode == "gradient" and dyn.multipliers is None and dyn.thresholds is None
    assert dyn.weights is not None and dyn.weights[-1].tolist() == [0.75, 0.25]


def test_load_composite_up_to_a_step(tmp_path: Path) -> None:
    """--max-step compares runs of different lengths at the same budget."""
    run = load_composite(_constrained(tmp_path), max_step=15)
    assert run.steps.tolist() == [0, 10]
    assert run.multipliers is not None and run.multipliers.shape == (2, 2)
    with pytest.raises(ValueError, match="no evaluation at or before step -1"):
        load_composite(tmp_path / "con", max_step=-1)


def test_load_composite_places_short_lists_by_constraint_names(tmp_path: Path) -> None:
    run_dir = _write_run(
        tmp_path,
        "obj",
        "constrained_ppo",
        [(0, 0.1, [0.0, 0.0])],
        extra={"constraint": "inequality", "constraint_names": ["fluency"], "thresholds": [0.3],
               "lagrange_multipliers": [0.5]},
    )
    run = load_composite(run_dir)
    assert run.thresholds is not None
    assert np.isnan(run.thresholds[0, 0]) and run.thresholds[0, 1] == 0.3


def test_load_composite_rejects_non_composite_and_missing(tmp_path: Path) -> None:
    plain = tmp_path / "ppo"
    plain.mkdir()
    (plain / "curves.jsonl").write_text(json.dumps({"method": "ppo", "step": 0, "kl": 0.0,
                                                    "gold_score": 0.1}) + "\n")
    with pytest.raises(ValueError, match=r"curves\.jsonl.*component_scores"):
        load_composite(plain)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "curves.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty.*curves\.jsonl.*no evaluation rows"):
        load_composite(empty)
    with pytest.raises(ValueError, match=r"curves\.jsonl: missing"):
        load_composite(tmp_path / "nothing_here_either_way")


def test_load_composite_skips_partial_line_and_keeps_last_repeat(tmp_path: Path) -> None:
    run_dir = _constrained(tmp_path)
    with (run_dir / "curves.jsonl").open("a", encoding="utf-8") as handle:
        first = json.loads((run_dir / "curves.jsonl").read_text().splitlines()[-1])
        handle.write(json.dumps({**first, "gold_score": 0.55}) + "\n")  # step 20 again (resumed run)
        handle.write('{"method": "constrained_ppo", "step": 30, "kl"')  # line still being written
    with pytest.warns(MalformedLineWarning, match=r"curves\.jsonl:5"):
        run = load_composite(run_dir)
    assert run.steps.tolist() == [0, 10, 20]
    assert run.gold[-1] == 0.55


# ---------------------------------------------------------------- tables


def test_table_hypervolume_peak_and_final_values(tmp_path: Path) -> None:
    runs = [load_composite(_constrained(tmp_path)), load_composite(_dynamic(tmp_path))]
    table = composite_table(runs)
    rows = _table_rows(table)
    con, dyn = rows["con"], rows["dyn"]
    assert con[1] == "constrained_ppo (inequality)"
    assert con[2] == "20 (3)"
    assert con[3] == "0.400 ± 0.010"  # final gold
    assert con[4] == "0.700 (10)"  # peak gold (step)
    assert con[5] == "10.000"  # final KL
    assert con[6] == "1.000, 2.000"
    assert con[7] == "0.800, 1.500"
    assert con[8] == "f(μ) 0.900, 0.250"
    # reference = step-0 (0, 0) - 1 = (-1, -1): final (1, 2) -> 2 * 3 = 6.
    assert con[9] == "6.000"
    # all points (0,0), (0.5,1), (1,2): (1,2) dominates the rest -> still 6.
    assert con[10] == "6.000"
    assert dyn[1] == "dynamic_ppo (gradient)"
    assert dyn[8] == "w 0.750, 0.250"
    assert dyn[9] == "4.500"  # (2, 0.5): 3 * 1.5
    assert "(-1.000, -1.000)" in table and "step-0 component scores of con minus 1.0" in table
    # Neither final point dominates the other; the union: 6 + 4.5 - overlap (2 * 1.5) = 7.5.
    assert "Non-dominated final points among the 2 run(s): con, dyn." in table
    assert "Hypervolume of all runs' final points together: 7.500." in table


def test_table_explicit_reference_and_dominated_run(tmp_path: Path) -> None:
    runs = [
        load_composite(_constrained(tmp_path)),
        load_composite(_dynamic(tmp_path, "weak", final=[0.5, 0.5])),
    ]
    table = composite_table(runs, reference=[0.0, 0.0])
    rows = _table_rows(table)
    assert rows["con"][9] == "2.000"
    assert rows["weak"][9] == "0.250"
    assert "Non-dominated final points among the 2 run(s): con." in table
    with pytest.raises(ValueError, match="reference"):
        composite_table(runs, reference=[0.0])


def test_nm_path_table_rows(tmp_path: Path) -> None:
    run = load_composite(_nm(tmp_path))
    assert run.nm_path is not None and len(run.nm_path) == 2
    table = nm_path_table(run)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| evaluation | step | phase | thresholds (sentiment, fluency)")
    assert lines[1] == "| 0 | 10 | search | 0.000, 0.000 | 0.200 | 0.200, 0.300 | 0.450, 0.350 |"
    assert lines[2] == "| 1 | 20 | search | 0.500, 0.000 | 0.500 | 0.400, 0.100 | 0.600, 0.200 |"
    assert "Best gold on the path: 0.500 at evaluation 1 (step 20)" in table
    assert "no Nelder-Mead path" in nm_path_table(load_composite(_constrained(tmp_path)))


# ---------------------------------------------------------------- figure and CLI


def test_plot_composite_writes_png(tmp_path: Path) -> None:
    runs = [load_composite(p) for p in (_constrained(tmp_path), _dynamic(tmp_path), _nm(tmp_path))]
    out = plot_composite(runs, tmp_path / "fig" / "composite.png", title="tiny")
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = [str(_constrained(tmp_path)), str(_nm(tmp_path))]
    out = tmp_path / "out"
    assert main([*dirs, "--out", str(out), "--title", "T"]) == 0
    printed = capsys.readouterr().out
    markdown = (out / "composite.md").read_text(encoding="utf-8")
    assert printed == markdown
    assert markdown.startswith("# T\n")
    assert "## Nelder–Mead path: nmrun" in markdown
    assert (out / "composite.png").stat().st_size > 0


def test_cli_exit_2_with_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("method: constrained_ppo\n")
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.composite", str(_constrained(tmp_path)), str(bad),
         "--out", str(tmp_path / "o")],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "curves.jsonl" in lines[0]
    assert not (tmp_path / "o" / "composite.md").exists()


def test_plot_proxy_points_writes_png(tmp_path: Path) -> None:
    from analysis.composite import plot_proxy_points

    fit = {"coefficients": [0.1, 0.4, -0.1], "proxy_point": 2.0, "points": [[0.0, 0.1], [1.0, 0.4], [3.0, 0.4]]}
    path = plot_proxy_points({"components": {"sentiment": fit, "fluency": fit}}, tmp_path / "pp.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no components"):
        plot_proxy_points({"components": {}}, tmp_path / "none.png")
