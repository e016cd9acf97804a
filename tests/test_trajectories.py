"""analysis.trajectories: training-order peak / final / drop and gold at a matched distance."""

from __future__ import annotations

import json

from analysis.load import load_runs
from analysis.trajectories import gold_at_distance, main, summary_row


def _run(tmp_path, points):
    """A run directory whose curves.jsonl holds (step, sqrt_kl, gold) points, initial gold 0.5."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"method": "ppo", "step": s, "kl": d * d, "sqrt_kl": d, "proxy_score": s / 10, "proxy_member_scores": [0.0],
             "gold_score": 0.5 + g, "gold_score_initial": 0.5, "aggregator": "wco"} for s, d, g in points]
    (run / "curves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_training_order_and_matched_distance(tmp_path):
    # KL rises then falls (a KL penalty pulls the policy back): d 0, 2, 6, 4; gold 0, .4, .2, .3
    run = _run(tmp_path, [(0, 0.0, 0.0), (10, 2.0, 0.4), (20, 6.0, 0.2), (30, 4.0, 0.3)])
    (curve,) = load_runs([run])
    row = summary_row(curve, [1.0, 4.0, 7.0])
    # the final point is the last step (d 4), not the largest d (6)
    assert abs(row["final"] - 0.3) < 1e-12 and row["d_final"] == 4.0
    assert abs(row["peak"] - 0.4) < 1e-12 and row["d_peak"] == 2.0 and row["step_peak"] == 10
    assert abs(row["drop"] - 0.1) < 1e-12
    # first crossing of d = 1: halfway between (0, 0) and (2, .4) -> .2; d = 4: halfway (2,.4)-(6,.2) -> .3
    assert abs(gold_at_distance(curve, 1.0) - 0.2) < 1e-12
    assert abs(row["gold_at_4"] - 0.3) < 1e-12
    assert row["gold_at_7"] is None  # never that far


def test_cli_writes_figure_and_table(tmp_path, capsys):
    run = _run(tmp_path, [(0, 0.0, 0.0), (10, 3.0, 0.5)])
    out, table = tmp_path / "fig.png", tmp_path / "t.md"
    assert main([str(run), "--out", str(out), "--at", "1.5", "--table", str(table)]) == 0
    assert out.stat().st_size > 1000
    text = table.read_text()
    assert "gold at d = 1.5" in text and "+0.25" in text  # halfway to (3, .5)
    assert main([str(tmp_path / "missing"), "--out", str(out)]) == 2
