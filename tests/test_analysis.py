"""Tests of analysis/: Gao et al. (2022) fits, overoptimization measures, loading, the report CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from analysis.fit import (
    bon_form,
    fit_rl,
    kl_gold_frontier,
    overoptimization_measures,
    predicted_peak_rl,
    rl_form,
)
from analysis.load import MalformedLineWarning, RunDirError, load_run, load_runs
from analysis.report import main
from rlhf_overopt.ops.scaling import bon_peak, fit_bon_form

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fits


def test_fit_bon_recovers_noiseless_coefficients() -> None:
    d = np.linspace(0.0, 3.0, 12)
    alpha, beta, r2 = fit_bon_form(d, bon_form(d, 1.3, 0.4), nonfinite="skip")
    assert alpha == pytest.approx(1.3, abs=1e-6)
    assert beta == pytest.approx(0.4, abs=1e-6)
    assert r2 == pytest.approx(1.0, abs=1e-9)


def test_fit_rl_recovers_noiseless_coefficients_with_d_zero_row() -> None:
    d = np.concatenate([[0.0], np.linspace(0.2, 8.0, 15)])
    r = rl_form(d, 2.0, 0.7)
    assert r[0] == 0.0
    alpha, beta, r2 = fit_rl(d, r)
    assert alpha == pytest.approx(2.0, abs=1e-6)
    assert beta == pytest.approx(0.7, abs=1e-6)
    assert r2 == pytest.approx(1.0, abs=1e-9)


def test_fits_recover_coefficients_from_noisy_data() -> None:
    rng = np.random.default_rng(0)
    d = np.linspace(0.05, 5.0, 200)
    bon = fit_bon_form(d, bon_form(d, 1.0, 0.25) + rng.normal(0.0, 0.02, d.size), nonfinite="skip")
    assert bon.alpha == pytest.approx(1.0, abs=0.02)
    assert bon.beta == pytest.approx(0.25, abs=0.01)
    assert bon.r2 > 0.95
    rl = fit_rl(d, rl_form(d, 2.0, 1.0) + rng.normal(0.0, 0.02, d.size))
    assert rl.alpha == pytest.approx(2.0, abs=0.02)
    assert rl.beta == pytest.approx(1.0, abs=0.02)
    assert rl.r2 > 0.95


def test_fit_ignores_nan_points_and_rejects_too_few() -> None:
    # analysis fits curves read back from run directories: a NaN point is a hole, skipped
    d = np.array([0.0, 1.0, 2.0, np.nan])
    alpha, beta, _ = fit_bon_form(d, np.array([0.0, 0.75, 1.0, 5.0]), nonfinite="skip")
    assert (alpha, beta) == (pytest.approx(1.0), pytest.approx(0.25))
    with pytest.raises(ValueError):
        fit_bon_form([0.0, 1.0], [0.0, 0.5], nonfinite="skip")  # one non-zero d cannot identify two coefficients
    with pytest.raises(ValueError):
        fit_rl([1.0], [0.3])


def test_r2_is_one_minus_ss_res_over_ss_tot() -> None:
    d = np.array([1.0, 2.0, 3.0])
    r = np.array([1.0, 1.0, 2.0])
    alpha, beta, r2 = fit_bon_form(d, r, nonfinite="skip")
    pred = bon_form(d, alpha, beta)
    expected = 1.0 - np.sum((r - pred) ** 2) / np.sum((r - r.mean()) ** 2)
    assert r2 == pytest.approx(expected)


def test_predicted_peaks_match_hand_values() -> None:
    assert bon_peak(1.0, 0.25) == pytest.approx(2.0)
    assert predicted_peak_rl(2.0, 1.0) == pytest.approx(math.e)
    assert bon_peak(1.0, 0.0) == math.inf
    assert predicted_peak_rl(1.0, -0.5) == math.inf
    # The predicted peak is the maximiser of the form.
    d = np.linspace(0.01, 10.0, 100_001)
    assert d[np.argmax(rl_form(d, 2.0, 1.0))] == pytest.approx(math.e, abs=1e-3)
    assert d[np.argmax(bon_form(d, 1.0, 0.25))] == pytest.approx(2.0, abs=1e-3)


# ---------------------------------------------------------------- measures


def test_overoptimization_measures_hand_curve() -> None:
    d = [0.0, 1.0, 2.0, 3.0, 4.0]
    gold = [0.0, 0.5, 1.0, 0.8, 0.6]
    proxy = [0.0, 1.0, 2.0, 3.0, 4.0]
    m = overoptimization_measures(d, gold, proxy)
    assert m["peak_gold"] == pytest.approx(1.0)
    assert m["sqrt_kl_at_peak"] == pytest.approx(2.0)
    assert m["kl_at_peak"] == pytest.approx(4.0)
    assert m["proxy_at_peak"] == pytest.approx(2.0)
    assert m["final_gold"] == pytest.approx(0.6)
    assert m["final_sqrt_kl"] == pytest.approx(4.0)
    assert m["final_proxy"] == pytest.approx(4.0)
    assert m["drop_from_peak"] == pytest.approx(0.4)
    assert m["drop_from_peak_rel"] == pytest.approx(0.4)


def test_overoptimization_measures_budget_and_initial() -> None:
    # RL: the last step (largest budget) is not the largest d.
    d = [0.0, 1.0, 3.0, 2.5]
    gold = [1.0, 2.0, 1.5, 1.2]  # raw gold; the initial policy scores 1.0
    m = overoptimization_measures(d, gold, [0, 1, 2, 3], budget=[0, 10, 20, 30], gold_initial=1.0)
    assert m["final_gold"] == pytest.approx(1.2)
    assert m["drop_from_peak"] == pytest.approx(0.8)
    assert m["drop_from_peak_rel"] == pytest.approx(0.8)  # 0.8 of the 1.0 gain was lost
    no_gain = overoptimization_measures([0, 1], [0.0, -0.5], [0, 1])
    assert math.isnan(no_gain["drop_from_peak_rel"])


def test_kl_gold_frontier() -> None:
    d = [3.0, 0.0, 2.0, 1.0, 1.0]
    gold = [3.0, 0.0, 1.0, 2.0, 1.5]
    assert kl_gold_frontier(d, gold).tolist() == [1, 3, 0]


# ---------------------------------------------------------------- fake runs

BON_AGGREGATORS = {"mean": (1.0, 0.25), "wco": (0.8, 0.1), "uwo": (0.9, 0.15)}


def _bon_rows() -> list[dict[str, Any]]:
    rows = []
    for aggregator, (alpha, beta) in BON_AGGREGATORS.items():
        for n in (1, 2, 4, 8, 16, 64, 256, 1024):
            kl = math.log(n) - (n - 1) / n
            d = math.sqrt(kl)
            rows.append(
                {
                    "method": "bon",
                    "step": 0,
                    "n": n,
                    "aggregator": aggregator,
                    "kl": kl,
                    "sqrt_kl": d,
                    "proxy_score": 0.1 + 0.6 * d,
                    "proxy_member_scores": [0.6 * d, 0.5 * d, 0.7 * d],
                    "gold_score": 0.3 + float(bon_form(d, alpha, beta)),
                }
            )
    return rows


def _ppo_rows() -> list[dict[str, Any]]:
    rows = []
    for step in range(0, 100, 10):
        d = 0.4 * step / 10
        rows.append(
            {
                "method": "ppo",
                "step": step,
                "kl": d * d,
                "sqrt_kl": d,
                "proxy_score": d,
                "proxy_member_scores": [d, 1.1 * d],
                "gold_score": -0.2 + float(rl_form(d, 1.0, 0.8)),
                "gold_score_initial": -0.2,
                "gold_stderr": 0.05,
                "kl_coef": 0.05,
            }
        )
    return rows


def _write_run(
    run_dir: Path, rows: list[dict[str, Any]], config: dict[str, Any], extra_lines: tuple[str, ...] = ()
) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps(row) for row in rows] + list(extra_lines)
    (run_dir / "curves.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    return run_dir


@pytest.fixture()
def runs(tmp_path: Path) -> tuple[Path, Path]:
    bon = _write_run(
        tmp_path / "runs" / "bon_run",
        _bon_rows(),
        {"method": "bon", "seed": 3, "wandb": {"project": "overopt-test", "group": "g1"}},
    )
    ppo = _write_run(
        tmp_path / "runs" / "sweep" / "ppo_kl0.05",
        _ppo_rows(),
        {"method": "ppo", "aggregate": {"name": "uwo"}, "ppo": {"kl_coef": 0.05}},
    )
    return bon, ppo


# ---------------------------------------------------------------- loading


def test_load_bon_run_gives_one_curve_per_aggregator(runs: tuple[Path, Path]) -> None:
    curves = load_run(runs[0])
    assert [c.aggregator for c in curves] == ["mean", "wco", "uwo"]
    mean = curves[0]
    assert mean.method == "bon" and mean.seed == 3 and mean.status == "completed"
    assert mean.kl_coef is None and mean.beta is None
    assert mean.n.tolist() == [1, 2, 4, 8, 16, 64, 256, 1024]
    assert mean.gold_initial_source == "smallest_kl"
    assert mean.gold[0] == 0.0 and mean.gold_raw[0] == pytest.approx(0.3)
    assert mean.proxy[0] == 0.0 and mean.proxy_raw[0] == pytest.approx(0.1)
    assert mean.member_scores.shape == (8, 3)


def test_load_sweep_folder_recursively_with_config_labels(runs: tuple[Path, Path]) -> None:
    curves = load_runs([runs[0].parent])
    assert sorted(c.method for c in curves) == ["bon", "bon", "bon", "ppo"]
    (ppo,) = [c for c in curves if c.method == "ppo"]
    assert ppo.aggregator == "uwo"  # from config aggregate.name: rows carry no aggregator
    assert ppo.kl_coef == pytest.approx(0.05)
    assert ppo.gold_initial_source == "gold_score_initial"
    np.testing.assert_allclose(ppo.gold, rl_form(ppo.sqrt_kl, 1.0, 0.8), atol=1e-12)
    # A run named twice (directly and through its sweep folder) is read once.
    assert len(load_runs([runs[0].parent, runs[1]])) == 4


def test_sweep_skips_run_without_curves_with_warning(runs: tuple[Path, Path]) -> None:
    sweep = runs[1].parent
    (sweep / "config.yaml").write_text("sweep: true\n")  # a sweep folder may hold its own config
    failed = sweep / "ppo_kl0.2"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "OOM"}))
    with pytest.warns(MalformedLineWarning, match="ppo_kl0.2"):
        curves = load_runs([sweep])
    assert [c.run_dir for c in curves] == [runs[1]]


def test_malformed_lines_are_skipped_with_file_and_line(tmp_path: Path) -> None:
    rows = _ppo_rows()[:3]
    missing_gold = {k: v for k, v in rows[0].items() if k != "gold_score"}
    run = _write_run(
        tmp_path / "run",
        rows,
        {"method": "ppo"},
        extra_lines=("{not json", json.dumps(missing_gold), "[1, 2]"),
    )
    with pytest.warns(MalformedLineWarning) as record:
        (curve,) = load_run(run)
    messages = [str(w.message) for w in record]
    path = str(run / "curves.jsonl")
    assert any(f"{path}:4:" in m and "invalid JSON" in m for m in messages)
    assert any(f"{path}:5:" in m and "gold_score" in m for m in messages)
    assert any(f"{path}:6:" in m for m in messages)
    assert curve.step.tolist() == [0, 10, 20]


def test_missing_curves_file_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: ppo\n")
    with pytest.raises(RunDirError, match="curves.jsonl"):
        load_runs([run])
    with pytest.raises(RunDirError, match="no such file"):
        load_runs([tmp_path / "nope"])


# ---------------------------------------------------------------- report


def _table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_report_end_to_end(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert main([str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    for name in ("curves_bon", "frontier_bon", "curves_ppo", "frontier_ppo"):
        png = out / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("|"))
    assert "kl_coef" in header and "seed" in header and "beta |" not in header
    rows = _table_rows(table)
    assert [(r[1], r[2]) for r in rows] == [("bon", "mean"), ("bon", "uwo"), ("bon", "wco"), ("ppo", "uwo")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    by_agg = {(r[1], r[2]): dict(zip(columns, r)) for r in rows}
    assert by_agg[("bon", "mean")]["fit form"] == "bon"
    assert float(by_agg[("bon", "mean")]["fit α"]) == pytest.approx(1.0, abs=1e-3)
    assert float(by_agg[("bon", "mean")]["fit β"]) == pytest.approx(0.25, abs=1e-3)
    assert float(by_agg[("bon", "mean")]["predicted peak d"]) == pytest.approx(2.0, abs=1e-3)
    ppo = by_agg[("ppo", "uwo")]
    assert ppo["fit form"] == "rl" and float(ppo["kl_coef"]) == pytest.approx(0.05)
    assert float(ppo["fit β"]) == pytest.approx(0.8, abs=1e-3)
    assert float(ppo["predicted peak d"]) == pytest.approx(math.exp(1.0 / 0.8 - 1.0), abs=1e-3)
    assert capsys.readouterr().out.strip() == table.split("\n\n")[0].strip()


def test_report_form_override_and_member_plots(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(runs[1]), "--out", str(out), "--form", "bon", "--members"]) == 0
    (row,) = _table_rows((out / "table.md").read_text())
    assert "bon" in row
    assert len(list(out.glob("members_ppo_*.png"))) == 1


def test_report_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "missing") in err[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "o")]) == 2
    only_bad = _write_run(tmp_path / "bad", [], {"method": "ppo"}, extra_lines=("oops",))
    assert main([str(only_bad), "--out", str(tmp_path / "o")]) == 2
    assert main([]) == 2
    result = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(tmp_path / "missing"), "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_wandb_upload_uses_config_section_and_offline_mode(
    runs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, Any] = {"log": [], "artifacts": []}

    class FakeRun:
        def log(self, data: dict[str, Any]) -> None:
            calls["log"].append(data)

        def log_artifact(self, artifact: Any) -> None:
            calls["artifacts"].append(artifact)

        def finish(self) -> None:
            calls["finished"] = True

    class FakeArtifact:
        def __init__(self, name: str, type: str) -> None:
            self.files: list[str] = []

        def add_file(self, path: str) -> None:
            self.files.append(path)

    def init(**kwargs: Any) -> FakeRun:
        calls["init"] = kwargs
        return FakeRun()

    fake = types.SimpleNamespace(
        init=init,
        Image=lambda path: ("image", path),
        Table=lambda columns, data: ("table", columns, data),
        Artifact=FakeArtifact,
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "report"
    assert main([str(runs[0]), str(runs[1]), "--out", str(out), "--wandb"]) == 0
    assert calls["init"]["mode"] == "offline"
    assert calls["init"]["project"] == "overopt-test" and calls["init"]["group"] == "g1"
    logged = calls["log"][0]
    assert sum(1 for key in logged if key.startswith("figures/")) == 4
    assert len(logged["overoptimization_table"][2]) == 4
    (artifact,) = calls["artifacts"]
    assert any(path.endswith("table.md") for path in artifact.files) and calls["finished"]


def test_group_table_fits_one_peak_per_run(tmp_path: Path) -> None:
    """A budget sweep whose runs peak exactly on Gao's RL form, each wandering in KL after its
    peak (as DPO runs do): the run-peaks fit recovers alpha and beta; the pooled fit cannot."""
    from analysis.load import load_runs
    from analysis.report import build_group_rows

    alpha, beta = 0.5, 0.2
    for i, peak_d in enumerate((1.0, 2.0, 4.0, 6.0)):
        peak_gold = float(rl_form(peak_d, alpha, beta))
        path = [(0.0, 0.0), (peak_d * 1.5, -0.3), (peak_d, peak_gold), (peak_d * 0.7, peak_gold - 0.4)]
        rows = [{"method": "dpo", "step": step, "kl": d * d, "sqrt_kl": d, "proxy_score": d,
                 "proxy_member_scores": [d], "gold_score": g, "beta": 0.1 * (i + 1)}
                for step, (d, g) in enumerate(path)]
        _write_run(tmp_path / "sweep" / f"b{i}", rows, {"method": "dpo", "dpo": {"beta": 0.1 * (i + 1)}})
    (row,) = build_group_rows(load_runs([tmp_path / "sweep"]))
    assert row["runs"] == 4
    assert row["peaks_fit_alpha"] == pytest.approx(alpha, abs=1e-9)
    assert row["peaks_fit_beta"] == pytest.approx(beta, abs=1e-9)
    assert row["peaks_fit_r2"] == pytest.approx(1.0, abs=1e-12)
    assert row["peaks_predicted_peak_sqrt_kl"] == pytest.approx(math.exp(alpha / beta - 1.0))
    assert row["fit_r2"] < 0.9
    two = build_group_rows(load_runs([tmp_path / "sweep" / "b0", tmp_path / "sweep" / "b1"]))[0]
    assert two.get("peaks_fit_r2") is None  # fewer than three runs: no run-peaks fit


def test_group_rows_and_frontier_use_each_runs_peak_and_final_point(tmp_path: Path) -> None:
    """Under a KL penalty a run's KL rises and comes back (#15): the group row reads each run's
    final point in training order, not the point of largest KL, and the frontier is drawn through
    each run's peak and final point only."""
    from analysis.load import load_runs, run_frontier
    from analysis.report import build_group_rows

    paths = {  # (d, gold) in training order
        "kl0.01": [(0.0, 0.0), (3.0, 0.5), (6.0, 0.6), (4.0, 0.55)],   # furthest at step 2, ends at d 4
        "kl0.1": [(0.0, 0.0), (1.0, 0.2), (2.0, 0.3), (1.5, 0.35)],    # peaks at its end
    }
    for name, path in paths.items():
        rows = [{"method": "ppo", "step": 10 * step, "kl": d * d, "sqrt_kl": d, "proxy_score": d,
                 "proxy_member_scores": [d], "gold_score": g, "kl_coef": float(name[2:])}
                for step, (d, g) in enumerate(path)]
        _write_run(tmp_path / "sweep" / name, rows, {"method": "ppo", "ppo": {"kl_coef": float(name[2:])}})
    curves = load_runs([tmp_path / "sweep"])
    (row,) = build_group_rows(curves)
    assert row["best_peak_gold"] == pytest.approx(0.6) and row["best_sqrt_kl_at_peak"] == pytest.approx(6.0)
    assert row["best_final_gold"] == pytest.approx(0.55) and row["best_final_run"] == "kl0.01"
    # the run that ended furthest out ended at d = 4 (not 6, where it passed on the way)
    assert row["largest_sqrt_kl"] == pytest.approx(4.0) and row["gold_at_largest_kl"] == pytest.approx(0.55)
    assert row["drop_from_best_peak"] == pytest.approx(0.05)
    d, gold = run_frontier(curves)
    order = np.lexsort((gold, d))
    assert d[order].tolist() == pytest.approx([1.5, 1.5, 4.0, 6.0])  # kl0.1 peaks at its end
    assert gold[order].tolist() == pytest.approx([0.35, 0.35, 0.55, 0.6])
