"""results/ and the docs pages agree (analysis.results --check), a number changed on a page, a config
key missing from the configuration reference or a block on two pages makes the check fail, and the seed
pooling computes what its docstring says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analysis.results import main
from analysis.seeds import Pooled, bootstrap_interval

ROOT = Path(__file__).resolve().parents[1]


def _docs(tmp_path: Path) -> Path:
    """A copy of docs/'s pages (no figures) to plant changes in."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("*.png"))
    return docs


def test_docs_match_the_records():
    assert main(["--check"]) == 0


def test_a_changed_page_fails_the_check(tmp_path, capsys):
    docs = _docs(tmp_path)
    results_page = docs / "results.md"
    text = results_page.read_text()
    start = text.index("<!-- results:grpo_vs_ppo -->")
    i = text.index("±", start)  # the first pooled number of the table
    j = text.rindex("|", start, i) + 2
    number = text[j:i].strip()
    results_page.write_text(text[:j] + f"{float(number) + 0.01:+.2f}" + " " + text[i:])
    config = docs / "reference" / "config.md"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.startswith("| `ppo.kl_coef` |")))  # a key missing from the reference
    lab = docs / "lab.md"
    block = text[start:text.index("<!-- /results:dpo_beta -->") + len("<!-- /results:dpo_beta -->")]
    block = block[block.index("<!-- results:dpo_beta -->"):]
    lab.write_text(lab.read_text() + "\n" + block + "\n")  # the same block on a second page
    assert main(["--check", "--docs", str(docs)]) == 1
    err = capsys.readouterr().err
    assert "grpo_vs_ppo: the table in results.md differs from what results/grpo_vs_ppo gives" in err
    assert "config: the table in reference/config.md differs from what the config dataclasses give" in err
    assert "dpo_beta: 2 pages under" in err and "(lab.md, results.md); exactly one must" in err
    assert err.count("\n") == 3, err


def test_write_then_check_round_trip(tmp_path):
    docs = _docs(tmp_path)
    page = docs / "results.md"
    text = page.read_text()
    start = text.index("<!-- results:grpo_vs_ppo -->") + len("<!-- results:grpo_vs_ppo -->")
    end = text.index("<!-- /results:grpo_vs_ppo -->")
    page.write_text(text[:start] + "\nstale\n" + text[end:])
    assert main(["--check", "--docs", str(docs)]) == 1
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results)
    spec = "".join(line for line in (results / "experiments.yaml").read_text().splitlines(keepends=True)
                   if not line.strip().startswith("figure:"))  # the repository's figures stay as they are
    (results / "experiments.yaml").write_text(spec)
    assert main(["--write", "--docs", str(docs), "--results", str(results)]) == 0
    assert page.read_text() == text
    assert main(["--check", "--docs", str(docs), "--results", str(results)]) == 0


def test_records_are_small_and_versioned():
    from analysis.results import RECORD_FILES, experiments

    folders = {spec.get("records", name) for name, spec in experiments().items() if spec["kind"] != "benchmarks"}
    runs = [run for name in sorted(folders) for run in (ROOT / "results" / name).iterdir()]
    assert len(runs) >= 70
    for run in runs:
        names = {p.name for p in run.iterdir()}
        assert names <= set(RECORD_FILES), names
        assert sum(p.stat().st_size for p in run.iterdir()) < 2_000_000, run  # records, never weights
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


def _bon_run(root: Path, name: str, seed: int, kind: str, golds: dict[str, list[float]]) -> None:
    """A best-of-n run's records: one curve per objective over n = 1, 2, 4 (gold relative to 0)."""
    import math

    import yaml

    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "bon", "seed": seed, "proxy": {"kind": kind}}))
    rows = []
    for agg, values in golds.items():
        for n, g in zip((1, 2, 4), values):
            kl = math.log(n) - (n - 1) / n
            rows.append({"method": "bon", "aggregator": agg, "n": n, "step": n, "kl": kl, "sqrt_kl": math.sqrt(kl),
                         "proxy_score": float(n), "proxy_member_scores": [0.0, 0.0], "gold_score": g,
                         "gold_score_initial": 0.0})
    (run / "curves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))


def test_bon_seeds_table_by_hand(tmp_path):
    from analysis.results import bon_seeds_table

    exp = tmp_path / "lab"
    # seed 0: members peak 0.3 / 0.5 (mean 0.4) and end at 0.1 / 0.3 (mean 0.2); uwo rises to 0.6
    _bon_run(exp, "s0", 0, "independent", {"member_0": [0.0, 0.3, 0.1], "member_1": [0.0, 0.5, 0.3],
                                           "uwo": [0.0, 0.4, 0.6]})
    _bon_run(exp, "s1", 1, "independent", {"member_0": [0.0, 0.2, 0.2], "member_1": [0.0, 0.4, 0.2],
                                           "uwo": [0.0, 0.5, 0.8]})
    _bon_run(exp, "m0", 0, "multihead", {"member_0": [0.0, 0.1, 0.0], "member_1": [0.0, 0.1, 0.0],
                                         "uwo": [0.0, 0.2, 0.1]})
    table = bon_seeds_table({"name": "lab", "group_by": ["proxy.kind"]}, tmp_path)
    lines = table.splitlines()
    single = next(x for x in lines if x.startswith("| kind independent | single member"))
    # per-seed member means: peak 0.4 and 0.3 -> 0.35 ± 0.07; largest-n 0.2 and 0.2 -> 0.20; drop 0.2 and 0.1
    assert "| 2 | +0.35 ± 0.07" in single and "+0.20 ± 0.00" in single
    uwo = next(x for x in lines if x.startswith("| kind independent | uwo"))
    assert "| 2 | +0.70 ± 0.14" in uwo and "+0.70 ± 0.14 [+0.60, +0.80] (0.80)" in uwo  # d = sqrt(log 4 - 3/4)
    assert "| kind multihead | uwo | 1 | +0.20 |" in table  # one seed: no interval
    assert "kind independent: uwo vs single members: peak-gold intervals do not overlap" in table


def test_signals_table_by_hand(tmp_path):
    from analysis.results import signals_table

    run = tmp_path / "sig" / "seed0"
    run.mkdir(parents=True)
    gold = [0.0, 0.3, 0.5, 0.2]  # peak at step 20
    rho = [0.8, 0.7, 0.5, 0.1]  # falls by 0.2 at step 20: not before the peak
    std = [0.2, 0.4, 0.5, 0.9]  # 1.5x at step 10: before the peak
    rows = [{"method": "grpo", "aggregator": "member_0", "step": 10 * i, "kl": float(i), "sqrt_kl": i ** 0.5,
             "proxy_score": 0.0, "proxy_member_scores": [0.0, 0.0], "gold_score": g, "gold_score_initial": 0.0,
             "proxy_gold_spearman": r, "proxy_member_std": m, "response_length": 10.0}
            for i, (g, r, m) in enumerate(zip(gold, rho, std))]
    (run / "curves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = signals_table({"name": "sig"}, tmp_path)
    assert "| seed0 | member_0 | +0.50 (20) | 0.80 → 0.50 → 0.10, step 20 (not before the peak) |" in table
    assert "0.20 → 0.50 → 0.90, step 10 (before the peak)" in table
    assert "10.00 → 10.00 → 10.00, never" in table
    assert "member std (rises by half from its first value): moved before gold's peak in 1 of 1 runs" in table


def _composite_run(root: Path, name: str, config: dict, points: list[tuple[float, float, float, float]]) -> None:
    """A composite run's records: rows of (gold, kl, sentiment, fluency) at steps 0, 10, 20, ..."""
    import yaml

    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"method": config["method"], "step": 10 * i, "kl": kl, "sqrt_kl": kl ** 0.5, "proxy_score": 0.0,
             "proxy_member_scores": [0.0], "gold_score": g, "gold_score_initial": 0.2,
             "component_names": ["sentiment", "fluency"], "component_scores": [a, b]}
            for i, (g, kl, a, b) in enumerate(points)]
    (run / "curves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_composite_seeds_table_by_hand(tmp_path):
    from analysis.results import composite_seeds_table
    exp = tmp_path / "comp"
    fixed = {"method": "dynamic_ppo", "weighting": {"mode": "fixed"}}
    # start (0, 0) -> reference (-1, -1); final (1, 1) -> hypervolume 2 * 2 = 4; (2, 0) -> 3 * 1 = 3
    _composite_run(exp, "f0", {**fixed, "seed": 0}, [(0.2, 0.0, 0.0, 0.0), (0.6, 4.0, 1.0, 1.0)])
    _composite_run(exp, "f1", {**fixed, "seed": 1}, [(0.2, 0.0, 0.0, 0.0), (0.7, 6.0, 0.5, 0.0), (0.4, 5.0, 2.0, 0.0)])
    mu = {"method": "constrained_ppo", "constrained": {"constraint": "inequality"}}
    _composite_run(exp, "c0", {**mu, "seed": 0}, [(0.2, 0.0, 0.0, 0.0), (1.0, 2.0, 3.0, 1.0)])  # hv 4 * 2 = 8
    _composite_run(exp, "c1", {**mu, "seed": 1}, [(0.2, 0.0, 0.0, 0.0), (1.2, 3.0, 1.0, 3.0)])  # hv 2 * 4 = 8
    spec = {"name": "comp", "group_by": {"dynamic_ppo": ["weighting.mode"], "constrained_ppo": ["constrained.constraint"]},
            "baseline": "dynamic_ppo fixed"}
    table = composite_seeds_table(spec, tmp_path)
    # fixed: final gold 0.4 and 0.2 (relative to 0.2) -> +0.30 ± 0.14; peak 0.4, 0.5; KL 4-5; hv 4 and 3
    assert "| dynamic_ppo fixed | 2 | 10 | +0.30 ± 0.14 [+0.20, +0.40] | +0.45 ± 0.07 [+0.40, +0.50] | 4.0–5.0 | 1.50 | 0.50 | 3.50 ± 0.71 [3.00, 4.00] |" in table
    assert "| constrained_ppo inequality | 2 | 10 | +0.90 ± 0.14 [+0.80, +1.00] |" in table
    assert "8.00 ± 0.00 [8.00, 8.00] |" in table
    assert "final gold of constrained_ppo inequality vs dynamic_ppo fixed: intervals do not overlap" in table
    assert "hypervolume of constrained_ppo inequality vs dynamic_ppo fixed: intervals do not overlap" in table


def test_rl_seeds_table_against_a_baseline_method(tmp_path):
    """DPO vs MADPO at one beta: rows labelled by their setting alone, each method against the
    baseline method's row of the same setting, on peak and final gold."""
    import yaml

    from analysis.results import rl_seeds_table

    for method, golds in (("dpo", [(0.3, 0.1), (0.4, 0.2)]), ("madpo", [(0.6, 0.6), (0.7, 0.7)])):
        for seed, (peak, final) in enumerate(golds):
            run = tmp_path / "d" / f"{method}{seed}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(yaml.safe_dump({"method": method, "seed": seed, "dpo": {"beta": 0.1}}))
            rows = [{"method": method, "aggregator": "mean", "step": s, "kl": k, "sqrt_kl": k ** 0.5, "proxy_score": 0.0,
                     "proxy_member_scores": [0.0], "gold_score": g, "gold_score_initial": 0.0, "beta": 0.1}
                    for s, k, g in ((0, 0.0, 0.0), (10, 4.0, peak), (20, 9.0, final))]
            (run / "curves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = rl_seeds_table({"name": "d", "group_by": ["dpo.beta"], "label": "setting", "baseline_method": "dpo",
                            "at": []}, tmp_path)
    assert table.startswith("| method | setting | seeds | peak gold | d at peak | final gold | drop |\n")
    assert "| dpo | beta=0.1 | 2 | +0.35 ± 0.07 [+0.30, +0.40] | 2.0 | +0.15 ± 0.07 [+0.10, +0.20] | 0.20 |" in table
    assert "beta=0.1: peak gold of madpo vs dpo: intervals do not overlap" in table
    assert "beta=0.1: final gold of madpo vs dpo: intervals do not overlap" in table


def test_rl_seeds_table_against_a_baseline_aggregator_per_coefficient(tmp_path):
    """UWO against member_0 at the same KL coefficient only, never across coefficients."""
    import yaml

    from analysis.results import rl_seeds_table

    finals = {("member_0", 0.03): (0.1, 0.2), ("uwo", 0.03): (0.5, 0.6), ("member_0", 0.1): (0.4, 0.5),
              ("uwo", 0.1): (0.45, 0.55)}
    for (agg, coef), values in finals.items():
        for seed, final in enumerate(values):
            run = tmp_path / "k" / f"{agg}-{coef}-{seed}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(yaml.safe_dump({"method": "ppo", "seed": seed, "ppo": {"kl_coef": coef}}))
            rows = [{"method": "ppo", "aggregator": agg, "step": s, "kl": k, "sqrt_kl": k ** 0.5, "proxy_score": 0.0,
                     "proxy_member_scores": [0.0], "gold_score": g, "gold_score_initial": 0.0, "kl_coef": coef}
                    for s, k, g in ((0, 0.0, 0.0), (10, 4.0, final))]
            (run / "curves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = rl_seeds_table({"name": "k", "group_by": ["ppo.kl_coef"], "baseline_aggregator": "member_0", "at": []},
                           tmp_path)
    assert "ppo: final gold of uwo kl_coef=0.03 vs member_0 kl_coef=0.03: intervals do not overlap" in table
    assert "ppo: final gold of uwo kl_coef=0.1 vs member_0 kl_coef=0.1: intervals overlap" in table
    assert table.count("intervals") == 4  # peak and final at each coefficient, nothing across them


def test_proxy_points_are_recorded_and_tabled(tmp_path):
    """A proxy_points run holds no curves itself: --collect keeps its thresholds.json beside its
    nested runs' records, and the table reads it."""
    from analysis.results import collect, proxy_points_table

    run = tmp_path / "runs" / "pp"
    (run / "runs" / "sentiment").mkdir(parents=True)
    (run / "runs" / "sentiment" / "curves.jsonl").write_text("")
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    fit = {"points": [[0.0, 0.2], [1.0, 0.5], [2.0, 0.6]], "coefficients": [0.2, 0.35, -0.05],
           "proxy_point": 2.0, "observed_peak_value": 2.0, "observed_peak_gold": 0.6}
    (run / "thresholds.json").write_text(json.dumps({"names": ["sentiment"], "components": {"sentiment": fit}}))
    records = tmp_path / "results"
    assert sorted(p.name for p in collect("pp", [str(run)], records)) == ["pp", "sentiment"]
    assert (records / "pp" / "pp" / "thresholds.json").exists()
    table = proxy_points_table({"name": "pp"}, records)
    assert "| sentiment | 0.00 → 2.00 | 0.200 | 0.600 (2.00) | 0.200, 0.350, -0.050 | 2.00 |" in table


def test_one_seed_is_not_compared():
    """One seed has no interval: a verdict against it says so instead of 'do not overlap'."""
    one, two, three = Pooled.of([0.5]), Pooled.of([0.1, 0.2]), Pooled.of([0.6, 0.7])
    assert one.verdict(two) == "not compared: one seed" == two.verdict(one)
    assert two.verdict(three) == "do not overlap" and three.verdict(Pooled.of([0.65, 0.8])) == "overlap"


def test_benchmarks_table_reads_the_chosen_rows(tmp_path, monkeypatch):
    from analysis import results

    record = {"machine": {"git_sha": "abc", "cores": 2, "load_average": "0.1"}, "written_at": "2026-12-01 20:00",
              "wall_min": 19.0, "rows": [
                  {"section": "ppo_step", "name": "update", "value": 1.2, "unit": "s", "ratio": 0.6667,
                   "baseline": "share of the PPO step", "target": "", "met": None},
                  {"section": "dpo", "name": "vs TRL", "value": 0.78, "unit": "x", "ratio": 0.78, "baseline": "TRL",
                   "target": "<= 1.0x", "met": True}]}
    (tmp_path / "B.json").write_text(json.dumps(record))
    monkeypatch.setattr(results, "ROOT", tmp_path)
    table = results.benchmarks_table({"file": "B.json", "rows": [["dpo", "vs TRL"], ["ppo_step", "update"]]})
    assert "(written 2026-12-01 20:00 in 19.0 min, git abc, 2 cores" in table
    assert table.index("| dpo | vs TRL | 0.78 x | 0.78 | TRL | <= 1.0x | yes |") < table.index(
        "| ppo_step | update | 1.2 s | 0.667 | share of the PPO step |  |  |")
    with pytest.raises(ValueError, match="no row 'zero' / 'x'"):
        results.benchmarks_table({"file": "B.json", "rows": [["zero", "x"]]})
