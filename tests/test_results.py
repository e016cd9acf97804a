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
    assert not hasattr(p, "overlaps") and not hasattr(p, "verdict")  # intervals describe one arm, never compare two
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
    # uwo and the members rank the same run's pool: paired by seed, d = 0.6 - 0.4, 0.8 - 0.3 -> +0.35,
    # sd 0.212, t_{0.975,1} = 12.706 -> +0.35 ± 1.906
    row = next(x for x in lines if x.startswith("| kind independent: uwo vs single members | peak gold |"))
    assert "| paired t (same runs) | 2 pairs | +0.350 [-1.556, +2.256] |" in row
    assert "| not resolved at 2 seeds (would need about" in row and row.endswith("| — |")
    assert "| kind multihead: uwo vs single members | peak gold | — | 1 + 1 |" in table
    assert "not compared: 1 seed" in table


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
    # tails: f1 peaked at +0.5 and ended at +0.2, losing more than half its gain
    assert ("| dynamic_ppo fixed | 2 | 10 | +0.30 ± 0.14 [+0.20, +0.40] | median +0.30, worst +0.20 (n=2) | "
            "0/2 = 0% [0%, 66%] | 1/2 = 50% [9%, 91%] | +0.45 ± 0.07 [+0.40, +0.50] | 4.0–5.0 | 1.50 | 0.50 | "
            "3.50 ± 0.71 [3.00, 4.00] |") in table
    assert "| constrained_ppo inequality | 2 | 10 | +0.90 ± 0.14 [+0.80, +1.00] |" in table
    assert "8.00 ± 0.00 [8.00, 8.00] |" in table
    # different runs without a recorded identity: Welch decides, +0.6 ± t_{0.975,2} * 0.1414 = ± 0.608;
    # the per-seed differences (0.4, 0.8), sd 0.283, beside it
    row = next(x for x in table.splitlines() if x.startswith("| constrained_ppo inequality vs dynamic_ppo fixed | final"))
    assert "| Welch (identities not recorded) | 2 + 2 | +0.600 [-0.008, +1.208] |" in row
    assert "| not resolved at 2 seeds per arm (would need about 3 per arm) |" in row
    assert "| +0.600 [-1.941, +3.141], p=0.2, X > Y at 2/2 seeds, detectable ±" in row  # ± 12.706 * 0.2
    # hypervolume 8, 8 vs 4, 3: +4.5, Welch se 0.5, df 1 -> [-1.853, +10.853]
    assert "| constrained_ppo inequality vs dynamic_ppo fixed | hypervolume | Welch" in table


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
    assert table.startswith("| method | setting | seeds | peak gold | d at peak | final gold | final gold: median, worst / "
                            "IQM | ended below the start | lost > half its gain | drop |\n")
    assert ("| dpo | beta=0.1 | 2 | +0.35 ± 0.07 [+0.30, +0.40] | 2.0 | +0.15 ± 0.07 [+0.10, +0.20] | "
            "median +0.15, worst +0.10 (n=2) | 0/2 = 0% [0%, 66%] | 1/2 = 50% [9%, 91%] | 0.20 |") in table
    # final: madpo 0.6, 0.7 vs dpo 0.1, 0.2 -> Welch +0.5 ± 4.303 * 0.0707; every seed +0.5 beside it
    row = next(x for x in table.splitlines() if x.startswith("| beta=0.1: madpo vs dpo | final gold |"))
    assert "| Welch (identities not recorded) | 2 + 2 | +0.500 [+0.196, +0.804] |" in row
    assert "| madpo > dpo | +0.500 [+0.500, +0.500], p<0.001, X > Y at 2/2 seeds, detectable ±0.000: madpo > dpo |" in row
    assert "| beta=0.1: madpo vs dpo | peak gold | Welch" in table


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
    rows = [x for x in table.splitlines() if x.startswith("| ppo: ")]
    assert len(rows) == 4  # peak and final at each coefficient, nothing across them
    assert any(x.startswith("| ppo: uwo kl_coef=0.03 vs member_0 kl_coef=0.03 | final gold |")
               and "| uwo kl_coef=0.03 > member_0 kl_coef=0.03 |" in x for x in rows)
    assert any(x.startswith("| ppo: uwo kl_coef=0.1 vs member_0 kl_coef=0.1 | final gold |")
               and "| not resolved at 2 seeds per arm (would need about" in x for x in rows)


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


def _arm(values: dict, identity=None, runs=None) -> dict:
    from analysis.results import Seeded

    return {seed: Seeded(v, frozenset({runs or f"run-{id(values)}-{seed}"}), identity and identity(seed))
            for seed, v in values.items()}


def test_compare_pairs_only_provable_pairs():
    """Recorded identities that match pair and the paired t decides; without them Welch decides and the
    seed-matched paired t is shown beside it; one seed is not compared."""
    from analysis.results import compare, comparison_row

    a, b = {0: 1.0, 1: 0.2, 2: -1.0}, {0: 1.1, 1: 0.3, 2: -0.8}
    same = {"proxy_cache_key": "p", "initial_policy": "pi", "eval_prompts": "e"}
    c, label, beside = compare(_arm(b, lambda s: {**same, "seed": s}), _arm(a, lambda s: {**same, "seed": s}))
    assert (c.estimator, label, beside) == ("paired t", "paired t (identities match)", None)
    assert c.diff == pytest.approx(0.4 / 3)
    c, label, beside = compare(_arm(b), _arm(a))
    assert (c.estimator, label) == ("Welch", "Welch (identities not recorded)")
    assert beside.estimator == "paired t" and beside.diff == pytest.approx(c.diff) and beside.high < c.high
    differ = compare(_arm(b, lambda s: {**same, "seed": s}), _arm(a, lambda s: {**same, "seed": -s}))
    assert differ[1] == "Welch (identities differ)"
    assert compare(_arm({0: 0.5}), _arm(a))[:2] == (None, "not compared: 1 seed")
    row = comparison_row("b vs a", "final gold", "b", _arm(b), "a", _arm(a))
    assert row.count("|") == 10 and "not resolved at 3 seeds per arm" in row and "X > Y at 3/3 seeds" in row


def test_published_comparisons_state_their_design():
    """Every comparison row on the docs pages (which test_docs_match_the_records proves equal to what the
    records give) names its estimator, seeds, interval, detectable difference and a verdict, never an
    interval-overlap test; the per-seed numbers recomputed by hand in issue #25 are there."""
    import itertools
    import re

    from analysis.results import COMPARISON_HEADER

    pages = [(ROOT / "docs" / p).read_text() for p in ("results.md", "lab.md")]
    header = COMPARISON_HEADER.splitlines()[0]
    rows = []
    for text in pages:
        for table in text.split(header + "\n")[1:]:
            lines = table.splitlines()
            assert lines[0].startswith("|---")
            rows += list(itertools.takewhile(lambda x: x.startswith("|"), lines[1:]))
    assert len(rows) >= 100
    verdict = re.compile(r"^(.+ > .+|not resolved at \d+(\+\d+)? seeds( per arm)? \(would need (about \d+|more than 10000)"
                         r"( per arm)?\)|not compared: 1 seed)$")
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 9, row
        _, _, estimator, seeds, interval, p, detectable, v, beside = cells
        assert verdict.match(v), row
        if estimator == "—":
            continue
        assert re.fullmatch(r"(paired t \((same runs|identities match)\)|Welch \(.+\))", estimator), row
        assert re.fullmatch(r"\d+ pairs|\d+ \+ \d+", seeds), row
        assert re.fullmatch(r"[+-]\d+\.\d{3} \[[+-]\d+\.\d{3}, [+-]\d+\.\d{3}\]", interval), row
        assert re.fullmatch(r"±\d+\.\d{3}", detectable) and re.fullmatch(r"<0\.001|[\d.e-]+", p), row
        assert estimator.startswith("Welch") or beside == "—", row
    for text in pages:
        assert "overlap" not in "\n".join(x for x in text.splitlines() if x.startswith("|"))
        assert "no difference" not in text
    rows_of = {tuple(c.strip() for c in r.strip("|").split("|")[:2]): r for r in rows}
    kl003 = rows_of[("ppo: uwo kl_coef=0.03 vs member_0 kl_coef=0.03", "final gold")]
    assert "+0.107 [+0.015, +0.200], p=0.029, X > Y at 6/7 seeds" in kl003
    assert "+0.142 [+0.046, +0.237], p=0.015, X > Y at 5/5 seeds" in rows_of[("beta=1.0: madpo vs dpo", "final gold")]
    assert "+0.069 [-0.093, +0.231]" in rows_of[("ppo: uwo kl_coef=0.1 vs member_0 kl_coef=0.1", "final gold")]
    assert "+0.079 [-0.139, +0.297]" in rows_of[("constrained_ppo inequality vs dynamic_ppo fixed", "final gold")]


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
