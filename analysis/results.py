"""The records behind the documentation's numbers, and the generated pages regenerated from them.

    python -m analysis.results --collect NAME RUN_OR_SWEEP_DIR ...   copy a run's small records into results/NAME/
    python -m analysis.results --write                               every generated block of docs/ and the figures
    python -m analysis.results --check                               exit 1 when a page under docs/ differs

`results/experiments.yaml` lists each experiment: the command that remakes its runs, where its
records are, how its table is built, and its figure. A record is what a run directory holds that
is small — `config.yaml` (resolved config with git SHA and library versions), `curves.jsonl`,
`summary.json` — never checkpoints or weights. Each table lives between `<!-- results:NAME -->` and
`<!-- /results:NAME -->` in exactly one page under docs/ (whichever page holds the markers); the
configuration reference lives between `<!-- generated:config -->` markers, built from the config
dataclasses. `--check` rebuilds every block and compares, so a number typed into a page by hand, or a
config key added without its page, fails it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from analysis.load import find_run_dirs, load_runs
from analysis.seeds import Pooled, group_by_setting, pooled_curve, pooled_summary
from analysis.stats import Comparison, Run, collapse_rate, compare_arms, drop_rate, paired, robust_location
from analysis.trajectories import summary_row
from rlhf_overopt.config.methods import fit_form

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOCS = ROOT / "docs"
RECORD_FILES = ("config.yaml", "curves.jsonl", "summary.json", "scaling.json", "thresholds.json")


def experiments(results: Path = RESULTS) -> dict[str, dict]:
    """The experiments of results/experiments.yaml, by name."""
    return yaml.safe_load((results / "experiments.yaml").read_text(encoding="utf-8")) or {}


def collect(name: str, sources: Sequence[str], results: Path = RESULTS) -> list[Path]:
    """Copy the records of every run under `sources` into results/<name>/<run>/; returns them."""
    out = []
    # a run that only orchestrates nested runs (proxy_points: thresholds.json, no curves) is a record too
    runs = [Path(source) for source in sources
            if (Path(source) / "summary.json").exists() and not (Path(source) / "curves.jsonl").exists()]
    runs += [run for source in sources for run in find_run_dirs(source)]
    names = [run.name for run in runs]
    for run in runs:
        # runs of different sweeps may share a name (seed0 of two sweeps): then the sweep's folder prefixes it
        target = results / name / (run.name if names.count(run.name) == 1 else f"{run.parent.name}-{run.name}")
        target.mkdir(parents=True, exist_ok=True)
        for f in RECORD_FILES:
            if (run / f).exists():
                shutil.copyfile(run / f, target / f)
        out.append(target)
    return out



# --- comparisons: paired where pairing is provable, Welch otherwise, with power ---------

@dataclass(frozen=True)
class Seeded:
    """One arm's outcome at one seed: the value, the run directories it was read from and the identity
    (proxy_cache_key, initial_policy, eval_prompts, ...) their config records under `_meta.identity`."""

    value: float
    runs: frozenset[str]
    identity: dict | None = None


def recorded_identity(config: dict) -> dict | None:
    """What the seed fixed, as the run recorded it (`_meta.identity`); None for records that predate it."""
    identity = (config.get("_meta") or {}).get("identity") if isinstance(config, dict) else None
    return dict(identity) if identity else None


def _identity_of(configs: Sequence[dict]) -> dict | None:
    """The identity every one of the configs records alike, else None."""
    found = [recorded_identity(c) for c in configs]
    return found[0] if found and all(f is not None and f == found[0] for f in found) else None


COMPARISON_HEADER = ("| comparison: X vs Y | outcome | deciding estimator | seeds | X − Y [95% interval] | p | "
                     "detectable (80% power, 5% level) | verdict | per-seed paired t (seed-matched, unverified) |\n"
                     "|---|---|---|---|---|---|---|---|---|")
"""Every comparison table's header: the estimator that decides, the design, and beside a Welch verdict
the per-seed paired result a reader would get if the seed-matched runs did share their seed's proxies,
initial policy and prompts (the records do not say so)."""


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}" if p >= 0.001 else "<0.001"


def compare(x: dict, y: dict) -> tuple[Comparison | None, str, Comparison | None]:
    """X against Y from {seed: Seeded}: (the deciding comparison of X - Y, its label, the per-seed paired
    comparison shown beside a Welch one).

    Two outcomes pair when they were read from the same runs (best-of-n objectives ranking one pool)
    or their runs record the same identity; when every seed pairs, the paired t decides. Otherwise
    Welch decides, and on the seeds both arms have (two or more) the paired t is computed beside it,
    unverified. An arm with one seed is not compared (None)."""
    if len(x) < 2 or len(y) < 2:
        return None, f"not compared: {min(len(x), len(y))} seed", None

    def runs(arm: dict, other: dict) -> list[Run]:
        out = []
        for seed, s in sorted(arm.items(), key=lambda kv: repr(kv[0])):
            o = other.get(seed)
            same = o is not None and s.runs == o.runs
            out.append(Run(seed, s.value, {"runs": tuple(sorted(s.runs))} if same else s.identity))
        return out

    ry, rx = runs(y, x), runs(x, y)
    c = compare_arms(ry, rx)
    if c.estimator == "paired t":
        same = all(r.identity and "runs" in r.identity for r in rx)
        return c, "paired t (same runs)" if same else "paired t (identities match)", None
    why = [text for key, text in (("no identity recorded", "identities not recorded"),
                                  ("identity differs", "identities differ"),
                                  ("no run at this seed", "seeds differ")) if key in c.pairing_note]
    label = f"Welch ({', '.join(why) or 'unpaired'})"
    common = sorted(set(x) & set(y), key=repr)
    beside = None
    if len(common) >= 2:
        beside = paired([y[s].value for s in common], [x[s].value for s in common], seeds=common)
    return c, label, beside


def _seeds_text(c: Comparison) -> str:
    return f"{c.n_a} pairs" if c.estimator == "paired t" else f"{c.n_b} + {c.n_a}"


def _paired_text(c: Comparison, x: dict, y: dict, name_x: str, name_y: str) -> str:
    """The per-seed paired result: X - Y with its t interval, p, seeds with X > Y, detectable difference, verdict."""
    ahead = sum(x[s].value > y[s].value for s in c.seeds)
    on = "" if c.n_a == len(x) == len(y) else f" on the {c.n_a} common seeds"
    p = _p(c.p)
    return (f"{c.diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}]{on}, p{p if p[0] == '<' else '=' + p}, "
            f"X > Y at {ahead}/{c.n_a} seeds, "
            f"detectable ±{c.detectable:.3f}: {c.verdict(name_y, name_x)}")


def comparison_row(label: str, what: str, name_x: str, x: dict, name_y: str, y: dict) -> str:
    """One row of a comparison table (COMPARISON_HEADER): X against Y on `what` (see `compare`)."""
    c, estimator, beside = compare(x, y)
    if c is None:
        return f"| {label} | {what} | — | {len(x)} + {len(y)} | — | — | — | {estimator} | — |"
    side = "—" if beside is None else _paired_text(beside, x, y, name_x, name_y)
    return (f"| {label} | {what} | {estimator} | {_seeds_text(c)} | {c.diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}] | "
            f"{_p(c.p)} | ±{c.detectable:.3f} | {c.verdict(name_y, name_x)} | {side} |")


def tails(final: Sequence[float], peak: Sequence[float], initial: Sequence[float]) -> list[str]:
    """The tails of a group of RL runs (Agarwal et al. 2021): a robust location of final gold (median and
    worst below 5 seeds, IQM from 5), the runs that ended below their initial policy's gold and those
    that lost more than half of their peak gain, each with its Wilson interval."""
    return [robust_location(final).text(), collapse_rate(final, initial).text(), drop_rate(final, peak, initial).text()]


TAIL_HEADER = ["final gold: median, worst / IQM", "ended below the start", "lost > half its gain"]

SETTING_DEFAULTS = {"aggregate.shaping": "none", "proxy.kind": "independent"}
"""Values of `group_by` keys that do not show in a row's label."""


def _rl_curves(spec: dict, results: Path) -> list:
    """The experiment's RL curves, plus those of `also: {other experiment: [aggregators]}`; with
    `group_by` config keys, a curve's aggregator label carries their non-default values
    (uwo shaping=par, member_0 kind=warm), so settings that share an aggregator stay apart."""
    import dataclasses

    curves = load_runs([results / spec["name"]])
    for other, wanted in (spec.get("also") or {}).items():  # entries "aggregator" or "method:aggregator"
        curves += [c for c in load_runs([results / other])
                   if str(c.aggregator) in wanted or f"{c.method}:{c.aggregator}" in wanted]
    out = []
    for c in curves:
        extra = [f"{k.split('.')[-1]}={v}" for k in spec.get("group_by", [])
                 if (v := _config_value(dict(c.config), k)) is not None and v != SETTING_DEFAULTS.get(k)]
        if spec.get("label") == "setting":  # the settings alone (DPO: the aggregator only scores evaluations)
            out.append(dataclasses.replace(c, aggregator=" ".join(extra) or "-"))
        else:
            out.append(dataclasses.replace(c, aggregator=" ".join([str(c.aggregator), *extra])) if extra else c)
    return out


def _by_seed(items: Sequence[tuple[object, str, float, dict | None]]) -> dict:
    """{seed: Seeded} from (seed, run directory, value, identity); a seed seen twice (or none) is
    keyed by its run as well, so it pairs with nothing."""
    seeds = [seed for seed, *_ in items]
    return {(seed if seed is not None and seeds.count(seed) == 1 else f"{seed}:{Path(run).name}"):
            Seeded(value, frozenset({run}), identity) for seed, run, value, identity in items}


def rl_seeds_table(spec: dict, results: Path = RESULTS) -> str:
    """RL runs pooled over seeds per (method, aggregator): peak gold (d at peak), final gold, drop and
    gold at each matched distance, as mean ± std [95% bootstrap interval], and the tails of final gold
    (`tails`). Then a comparison table (`comparison_row`): each row against its method's single proxy
    (member_i) on final gold; with `baseline_method: M` each other method's row against M's row of the
    same setting, on peak and final gold (DPO vs MADPO at one beta); with `baseline_aggregator: A` each
    row against A's row of the same setting (UWO vs member_0 at one KL coefficient). `order: [labels]`
    orders the rows. `label: setting` labels rows by their group_by values only."""
    at = [float(x) for x in spec.get("at", [4, 8])]
    groups = group_by_setting(_rl_curves(spec, results))
    if spec.get("order"):  # rows in the spec's order of labels (e.g. data tiers high, medium, low), then the rest
        order = spec["order"]
        groups = dict(sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]) if kv[0][1] in order
                                                            else len(order), kv[0][1])))
    column = "setting" if spec.get("label") == "setting" else "aggregator"
    header = ["method", column, "seeds", "peak gold", "d at peak", "final gold", *TAIL_HEADER, "drop",
              *(f"gold at d = {x:g}" for x in at)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    outcomes: dict[tuple[str, str], dict[str, dict]] = {}
    for (method, agg), group in groups.items():
        s = pooled_summary(group, at)
        rows = [summary_row(c, []) for c in group]
        initial = [float(c.gold[np.argsort(c.step, kind="stable")][0]) for c in group]  # gold at the run's first step
        outcomes[(method, agg)] = {w: _by_seed([(c.seed, str(c.run_dir), r[w], _identity_of([dict(c.config)]))
                                                for c, r in zip(group, rows)]) for w in ("peak", "final")}
        cells = [method, agg, str(len(group)), s["peak"].text(), f"{s['d_peak'].mean:.1f}", s["final"].text(),
                 *tails([r["final"] for r in rows], [r["peak"] for r in rows], initial),
                 f"{s['drop'].mean:.2f}", *("—" if s[f"gold_at_{x:g}"] is None else s[f"gold_at_{x:g}"].text()
                                          for x in at)]
        lines.append("| " + " | ".join(cells) + " |")
    comparisons = [COMPARISON_HEADER]
    for (method, label), (other, name, what, name_x, name_y) in _rl_baselines(spec, list(groups)).items():
        for w in what:
            comparisons.append(comparison_row(name, f"{w} gold", name_x, outcomes[(method, label)][w], name_y,
                                              outcomes[other][w]))
    if len(comparisons) == 1:
        return "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n\n" + "\n".join(comparisons) + "\n"


def _rl_baselines(spec: dict, keys: list[tuple[str, str]]) -> dict:
    """(method, label) -> (its baseline row, the comparison's name, the quantities compared, the names of
    the row and of its baseline in a verdict):
    `baseline_aggregator` (same setting), `baseline_method` (same label), or by default the method's
    first single-proxy (member_i) row, on final gold."""
    out = {}
    for method, label in keys:
        if spec.get("baseline_aggregator"):
            base = spec["baseline_aggregator"]
            head, *rest = label.split(" ")
            other = (method, " ".join([base, *rest]))
            if head != base and other in keys:
                out[(method, label)] = (other, f"{method}: {label} vs {other[1]}", ("peak", "final"), label, other[1])
        elif spec.get("baseline_method"):
            other = (spec["baseline_method"], label)
            if method != other[0] and other in keys:
                out[(method, label)] = (other, f"{label}: {method} vs {other[0]}", ("peak", "final"), method, other[0])
        else:
            single = next((k for k in keys if k[0] == method and k[1].startswith("member_")), None)
            if single is not None and (method, label) != single:
                out[(method, label)] = (single, f"{method}: {label} vs {single[1]}", ("final",), label, single[1])
    return out


def _save(fig, out: Path) -> Path:
    """Lay out, write (folders created) and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def rl_seeds_figure(spec: dict, out: Path, results: Path = RESULTS) -> Path:
    """Gold and proxy against the step (mean ± std band over seeds) and gold along the mean
    trajectory in d, per (method, aggregator)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_by_setting(_rl_curves(spec, results))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    styles = {m: s for m, s in zip(sorted({m for m, _ in groups}), ("-", "--", ":", "-."))}
    colors = {a: f"C{i}" for i, a in enumerate(sorted({a for _, a in groups}))}
    for (method, agg), group in groups.items():
        kw = {"linestyle": styles[method], "color": colors[agg], "label": f"{method} {agg} ({len(group)} seeds)"}
        steps, gold, gold_sd = pooled_curve(group, "gold")
        _, proxy, proxy_sd = pooled_curve(group, "proxy")
        _, d, _ = pooled_curve(group, "sqrt_kl")
        axes[0].plot(steps, gold, marker="o", markersize=3, **kw)
        axes[0].fill_between(steps, gold - gold_sd, gold + gold_sd, color=colors[agg], alpha=0.12)
        axes[1].plot(d, gold, marker="o", markersize=3, **kw)
        axes[2].plot(steps, proxy, marker="o", markersize=3, **kw)
        axes[2].fill_between(steps, proxy - proxy_sd, proxy + proxy_sd, color=colors[agg], alpha=0.12)
    for ax, (x, y, title) in zip(axes, (("training step", "gold - initial", "gold (mean ± std over seeds)"),
                                         ("sqrt(KL(pi || pi_init)), mean over seeds", "gold - initial",
                                          "gold along the mean trajectory"),
                                         ("training step", "proxy (optimized) - initial", "proxy (mean ± std)"))):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, out)


def rl_frontier_figure(spec: dict, out: Path, results: Path = RESULTS) -> Path:
    """The sweep frontier (analysis.plots.plot_frontier) of the experiment's RL runs, every seed and
    coefficient a thin line in training order with its peak and final point, per aggregator the
    best peak or final gold within each KL budget."""
    from analysis.plots import plot_frontier

    curves = _rl_curves({**spec, "group_by": []}, results)
    return plot_frontier(curves, out, title=spec.get("title"))


def _config_value(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


SINGLE = "single member (mean of K)"


def _bon_groups(spec: dict, results: Path) -> dict[tuple[str, str], dict[int, list]]:
    """Best-of-n curves by (setting, objective) and seed: the setting is the values of the spec's
    `group_by` config keys (e.g. proxy.kind); every single member (member_i) is one objective,
    "single member (mean of K)", averaged within its seed."""
    curves = [c for c in load_runs([results / spec["name"]], x=spec.get("x", "kl"))
              if fit_form(c.method) == "bon"]
    keys = spec.get("group_by", [])
    groups: dict[tuple[str, str], dict[int, list]] = {}
    for c in curves:
        setting = ", ".join(f"{k.split('.')[-1]} {_config_value(dict(c.config), k)}" for k in keys) or "-"
        agg = str(c.aggregator)
        objectives = [agg]
        if c.num_members == 1 and re.fullmatch(r"member_\d+", agg) is None and "+" not in agg:
            continue  # one model: every aggregator is that model, its row below
        if c.num_members == 1 and re.fullmatch(r"member_\d+", agg) is not None:
            objectives = ["the one model (K = 1)"]
        elif re.fullmatch(r"member_\d+", agg) is not None:
            # every member pools into one row (a K = 1 ensemble, e.g. WARM's average, is its one model);
            # a member named in the spec's objectives also keeps its own row
            objectives = [SINGLE] + ([agg] if agg in spec.get("objectives", ()) else [])
        seed = c.seed if c.seed is not None else -1
        for objective in objectives:
            groups.setdefault((setting, objective), {}).setdefault(seed, []).append(c)
    return groups


def bon_seeds_table(spec: dict, results: Path = RESULTS) -> str:
    """Best-of-n curves pooled over seeds per (setting, objective): peak gold, d at the peak, gold at
    the largest n and the drop (peak - gold at the largest n), as mean ± std [95% bootstrap interval]
    over seeds (a seed's single-member numbers are the mean over its K members; d is sqrt of the spec's
    `x`: the analytic `kl` or the exact pool KL `kl_pool`). Then a comparison table (`comparison_row`)
    of each objective against the single members of the same setting (or of `baseline_setting`), and
    of the spec's named `pairs`, on peak gold and gold at the largest n: objectives ranking the same
    run's pool pair by seed and the paired t decides."""
    groups = _bon_groups(spec, results)
    lines = ["| setting | objective | seeds | peak gold | d at peak | gold at the largest n (d) | drop |",
             "|---|---|---|---|---|---|---|"]
    pooled: dict[tuple[str, str], dict[str, Pooled]] = {}
    outcomes: dict[tuple[str, str], dict[str, dict]] = {}
    order = spec.get("objectives")
    for key in sorted(groups, key=lambda k: (k[0], order.index(k[1]) if order and k[1] in order else len(order or ()),
                                            k[1])):
        if order and key[1] not in order:
            continue
        per_seed = []
        for seed, curves in sorted(groups[key].items()):
            rows = [summary_row(c, []) for c in curves]
            per_seed.append({f: float(np.mean([r[f] for r in rows])) for f in ("peak", "d_peak", "final", "d_final",
                                                                                 "drop")})
            per_seed[-1]["seeded"] = (seed, frozenset(str(c.run_dir) for c in curves),
                                      _identity_of([dict(c.config) for c in curves]))
        s = {f: Pooled.of([r[f] for r in per_seed]) for f in ("peak", "d_peak", "final", "d_final", "drop")}
        pooled[key] = s
        outcomes[key] = {f: {r["seeded"][0]: Seeded(r[f], r["seeded"][1], r["seeded"][2]) for r in per_seed}
                         for f in ("peak", "final")}
        lines.append(f"| {key[0]} | {key[1]} | {len(per_seed)} | {s['peak'].text()} | {s['d_peak'].mean:.2f} | "
                     f"{s['final'].text()} ({s['d_final'].mean:.2f}) | {s['drop'].text()} |")
    comparisons = [COMPARISON_HEADER]
    what = (("peak", "peak gold"), ("final", "gold at the largest n"))
    for (setting, objective) in pooled:
        against = setting if (setting, SINGLE) in pooled else spec.get("baseline_setting")
        if (against, SINGLE) not in pooled or objective == SINGLE:
            continue
        whose = "single members" if against == setting else f"the single members of {against}"
        for f, w in what:
            comparisons.append(comparison_row(f"{setting}: {objective} vs {whose}", w, objective,
                                              outcomes[(setting, objective)][f], whose,
                                              outcomes[(against, SINGLE)][f]))
    for a_setting, a_objective, b_setting, b_objective in spec.get("pairs", []):  # named cross-setting comparisons
        a, b = (a_setting, a_objective), (b_setting, b_objective)
        if a not in pooled or b not in pooled:
            continue
        for f, w in what:
            comparisons.append(comparison_row(f"{a_setting} {a_objective} vs {b_setting} {b_objective}", w,
                                              " ".join(a), outcomes[a][f], " ".join(b), outcomes[b][f]))
    if len(comparisons) == 1:
        return "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n\n" + "\n".join(comparisons) + "\n"


def bon_seeds_figure(spec: dict, out: Path, results: Path = RESULTS) -> Path:
    """Gold against sqrt(KL) per objective, mean ± std band over seeds, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _bon_groups(spec, results)
    settings = sorted({s for s, _ in groups})
    objectives = sorted({o for _, o in groups})
    colors = {o: f"C{i % 10}" for i, o in enumerate(objectives)}
    ncols = min(3, len(settings))
    nrows = -(-len(settings) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    for ax, setting in zip(axes.flat, settings):
        for objective in objectives:
            seeds = groups.get((setting, objective))
            if not seeds or (spec.get("objectives") and objective not in spec["objectives"]):
                continue
            # a seed's curve: the mean over its curves (its K members for the single-member row)
            per_seed = [np.mean([c.gold for c in cs], axis=0) for _, cs in sorted(seeds.items())]
            d = next(iter(seeds.values()))[0].sqrt_kl
            mean, sd = np.mean(per_seed, axis=0), (np.std(per_seed, axis=0, ddof=1) if len(per_seed) > 1
                                                   else np.zeros(len(d)))
            ax.plot(d, mean, marker="o", markersize=3, color=colors[objective],
                    label=f"{objective} ({len(per_seed)} seeds)")
            ax.fill_between(d, mean - sd, mean + sd, color=colors[objective], alpha=0.12)
        ax.set_title(setting)
        ax.set_xlabel("sqrt(KL_bon), exact over the pool" if spec.get("x") == "kl_pool"
                      else "sqrt(KL_bon) = sqrt(log n - (n-1)/n), analytic")
        ax.set_ylabel("gold - initial")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


SIGNALS = {  # key: (label, "moved" test against the first evaluation's value)
    "proxy_gold_spearman": ("proxy-gold rank correlation", "falls by 0.2", lambda v, v0: v <= v0 - 0.2),
    "proxy_member_std": ("member std", "rises by half", lambda v, v0: v >= 1.5 * v0),
    "response_length": ("response length", "rises by a quarter", lambda v, v0: v >= 1.25 * v0),
}
"""The overoptimization signals logged at every RL evaluation, and when each counts as having moved."""


def signals_table(spec: dict, results: Path = RESULTS) -> str:
    """When each overoptimization signal moves, against when gold peaks, run by run: the first
    evaluation at which it has moved (SIGNALS) and whether that is before gold's peak (early
    warning) or only at or after it (audit); then how many runs it warned in before the peak."""
    from rlhf_overopt.run.directory import read_jsonl

    lines = ["| run | aggregator | gold peak (step) | " + " | ".join(
        f"{label}: start → peak → end, moved at" for label, _, _ in SIGNALS.values()) + " |",
             "|" + "---|" * (3 + len(SIGNALS))]
    early = {k: 0 for k in SIGNALS}
    measured = {k: 0 for k in SIGNALS}
    runs = find_run_dirs(results / spec.get("records", spec["name"]))  # records: another experiment's runs
    for run in runs:
        rows = sorted((r for r in read_jsonl(run / "curves.jsonl") if "gold_score" in r), key=lambda r: r["step"])
        peak = max(range(len(rows)), key=lambda i: rows[i]["gold_score"])
        gold0 = rows[0].get("gold_score_initial", rows[0]["gold_score"])
        cells = [run.name, str(rows[0].get("aggregator")),
                 f"{rows[peak]['gold_score'] - gold0:+.2f} ({rows[peak]['step']})"]
        for key, (_, _, moved) in SIGNALS.items():
            values = [r.get(key) for r in rows]
            if any(v is None for v in values):
                cells.append("—")
                continue
            if key == "proxy_member_std" and len(rows[0].get("proxy_member_scores", ())) < 2:
                cells.append("— (one model)")  # no disagreement to measure
                continue
            measured[key] += 1
            at = next((i for i, v in enumerate(values) if moved(v, values[0])), None)
            if at is not None and at < peak:
                early[key] += 1
            when = "never" if at is None else f"step {rows[at]['step']} ({'before' if at < peak else 'not before'} the peak)"
            cells.append(f"{values[0]:.2f} → {values[peak]:.2f} → {values[-1]:.2f}, {when}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{label} ({rule} from its first value): moved before gold's peak in {early[k]} of {measured[k]} runs"
             for k, (label, rule, _) in SIGNALS.items()]
    return "\n".join(lines) + "\n\n" + "".join(f"- {n}\n" for n in notes)


def _composite_runs(spec: dict, results: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """The experiment's composite runs by setting ("method" plus the values of the spec's
    `group_by: {method: [config keys]}`), each with its evaluation rows in step order and its
    run-level numbers; and the component names."""
    from analysis.composite import points_hypervolume
    from rlhf_overopt.run.directory import read_jsonl

    keys, offset = spec.get("group_by") or {}, float(spec.get("hv_offset", 1.0))
    per_setting: dict[str, list[dict]] = {}
    names: list[str] = []
    for run in find_run_dirs(results / spec["name"]):
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        rows = sorted((r for r in read_jsonl(run / "curves.jsonl") if "gold_score" in r), key=lambda r: r["step"])
        method = config["method"]
        setting = " ".join([method, *(str(_config_value(config, k)) for k in keys.get(method, ()))])
        gold0 = rows[0].get("gold_score_initial", rows[0]["gold_score"])
        first, last = rows[0]["component_scores"], rows[-1]["component_scores"]
        names = rows[0].get("component_names", names)
        per_setting.setdefault(setting, []).append({
            "rows": rows, "gold0": gold0, "seed": config.get("seed"), "run": str(run),
            "identity": recorded_identity(config), "initial": rows[0]["gold_score"] - gold0,
            "final": rows[-1]["gold_score"] - gold0, "peak": max(r["gold_score"] for r in rows) - gold0,
            "kl": rows[-1]["kl"], "steps": rows[-1]["step"], "components": last,
            "hv": points_hypervolume(np.array([last], dtype=np.float64), np.array(first, dtype=np.float64) - offset)})
    return dict(sorted(per_setting.items())), names


def composite_seeds_table(spec: dict, results: Path = RESULTS) -> str:
    """Composite-reward runs (two or more component proxies) pooled over seeds per setting
    (_composite_runs): final gold and peak gold (relative to the initial policy) with the tails of final
    gold (`tails`), KL at the end, each component's proxy score at the end, and the hypervolume of the
    final component point against the step-0 point minus `hv_offset` (1 by default,
    weighting.hv_reference_offset's default), as mean ± std [95% bootstrap interval]; then a comparison
    table (`comparison_row`) of each setting against the `baseline` setting on final gold and hypervolume."""
    per_setting, names = _composite_runs(spec, results)
    lines = ["| setting | seeds | steps | final gold | " + " | ".join(TAIL_HEADER) + " | peak gold | KL at the end | "
             + " | ".join(f"{n} at the end" for n in names) + " | hypervolume of the final point |",
             "|" + "---|" * (10 + len(names))]
    pooled: dict[str, dict[str, Pooled]] = {}
    for setting, runs in per_setting.items():
        pooled[setting] = {k: Pooled.of([r[k] for r in runs]) for k in ("final", "peak", "hv")}
        kl = [r["kl"] for r in runs]
        comps = [f"{np.mean([r['components'][j] for r in runs]):.2f}" for j in range(len(names))]
        lines.append("| " + " | ".join([setting, str(len(runs)), str(runs[0]["steps"]), pooled[setting]["final"].text(),
                                         *tails([r["final"] for r in runs], [r["peak"] for r in runs],
                                                [r["initial"] for r in runs]),
                                         pooled[setting]["peak"].text(), f"{min(kl):.1f}–{max(kl):.1f}", *comps,
                                         pooled[setting]["hv"].text(".2f")]) + " |")
    comparisons = [COMPARISON_HEADER]
    base = spec.get("baseline")
    for setting, runs in per_setting.items():
        if base in per_setting and setting != base:
            for what, key in (("final gold", "final"), ("hypervolume", "hv")):
                x, y = ([(r["seed"], r["run"], r[key], r["identity"]) for r in rs] for rs in (runs, per_setting[base]))
                comparisons.append(comparison_row(f"{setting} vs {base}", what, setting, _by_seed(x), base,
                                                  _by_seed(y)))
    if len(comparisons) == 1:
        return "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n\n" + "\n".join(comparisons) + "\n"


def composite_seeds_figure(spec: dict, out: Path, results: Path = RESULTS) -> Path:
    """Gold against the step (mean ± std over seeds) and the path of the component scores (first
    against second, mean over seeds, in step order with the start marked), per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_setting, names = _composite_runs(spec, results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, (setting, runs) in enumerate(per_setting.items()):
        steps = sorted(set.intersection(*({r["step"] for r in run["rows"]} for run in runs)))
        at = [{r["step"]: r for r in run["rows"]} for run in runs]
        gold = np.array([[a[t]["gold_score"] - run["gold0"] for t in steps] for a, run in zip(at, runs)])
        comp = np.array([[a[t]["component_scores"][:2] for t in steps] for a in at]).mean(axis=0)
        sd = gold.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
        label = f"{setting} ({len(runs)} seeds)"
        axes[0].plot(steps, gold.mean(axis=0), marker="o", markersize=3, color=f"C{i}", label=label)
        axes[0].fill_between(steps, gold.mean(axis=0) - sd, gold.mean(axis=0) + sd, color=f"C{i}", alpha=0.12)
        axes[1].plot(comp[:, 0], comp[:, 1], marker="o", markersize=3, color=f"C{i}", label=label)
        axes[1].plot(comp[0, 0], comp[0, 1], "k^", markersize=6)
    axes[0].set(xlabel="training step", ylabel="gold - initial", title="gold (mean ± std over seeds)")
    if len(names) >= 2:
        axes[1].set(xlabel=f"{names[0]} proxy", ylabel=f"{names[1]} proxy",
                    title="component scores in training order (triangle: start)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def _thresholds(spec: dict, results: Path) -> dict:
    found = sorted((results / spec["name"]).glob("*/thresholds.json"))
    if len(found) != 1:
        raise ValueError(f"results/{spec['name']}: a proxy_points experiment holds one thresholds.json, found {len(found)}")
    return json.loads(found[0].read_text(encoding="utf-8"))


def proxy_points_table(spec: dict, results: Path = RESULTS) -> str:
    """A proxy_points run (Moskovitz et al. 2023, §3) from its thresholds.json: per component, its
    value at the start and the end of the run that pushed it alone, gold's observed peak, the
    quadratic fit a + b v + c v^2 of gold against the value, and the proxy point (the fit's maximum
    within the observed range)."""
    t = _thresholds(spec, results)
    lines = [("| component | value at the start → end | gold at the start | gold's observed peak (at value) | "
              "quadratic fit a, b, c | proxy point |"), "|---|---|---|---|---|---|"]
    for name, fit in t["components"].items():
        first, last = fit["points"][0], fit["points"][-1]
        a, b, c = fit["coefficients"]
        lines.append(f"| {name} | {first[0]:.2f} → {last[0]:.2f} | {first[1]:.3f} | {fit['observed_peak_gold']:.3f} "
                     f"({fit['observed_peak_value']:.2f}) | {a:.3f}, {b:.3f}, {c:.3f} | {fit['proxy_point']:.2f} |")
    return "\n".join(lines) + "\n"


def proxy_points_figure(spec: dict, out: Path, results: Path = RESULTS) -> Path:
    """analysis.composite.plot_proxy_points of the recorded thresholds.json."""
    from analysis.composite import plot_proxy_points

    return plot_proxy_points(_thresholds(spec, results), out)


def benchmarks_table(spec: dict, results: Path = RESULTS) -> str:
    """Chosen rows of the benchmark record (`file`, BENCHMARKS.json at the repository root, written by
    `python bench/run.py`): per `rows` entry [section, figure name], its value and unit, and its ratio
    to the figure it is measured against, from the same run; the record's date and git SHA first."""
    import json

    record = json.loads((ROOT / spec.get("file", "BENCHMARKS.json")).read_text(encoding="utf-8"))
    by_name = {(r["section"], r["name"]): r for r in record["rows"]}
    machine = record.get("machine", {})
    when = f"written {record['written_at']} in {record['wall_min']} min, " if "written_at" in record else ""
    lines = [(f"From `{spec.get('file', 'BENCHMARKS.json')}` ({when}git {machine.get('git_sha', '?')}, "
              f"{machine.get('cores', '?')} cores, load {machine.get('load_average', '?')} at its start):"), "",
             "| section | figure | value | ratio | vs | target | met |", "|---|---|---:|---:|---|---|---|"]
    for section, name in spec["rows"]:
        if (section, name) not in by_name:
            raise ValueError(f"{spec.get('file', 'BENCHMARKS.json')}: no row {section!r} / {name!r}")
        r = by_name[(section, name)]
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.3g}"
        met = "" if r.get("met") is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {section} | {name} | {r['value']:.3g} {r['unit']} | {ratio} | {r.get('baseline') or ''} | "
                     f"{r.get('target') or ''} | {met} |")
    return "\n".join(lines) + "\n"


def _scaling_run(spec: dict, results: Path) -> Path:
    runs = find_run_dirs(results / spec["name"])
    if len(runs) != 1:
        raise ValueError(f"results/{spec['name']}: a scaling_law experiment holds one run, found {len(runs)}")
    return runs[0]


def scaling_table(spec: dict, results: Path = RESULTS) -> str:
    """A scaling_law run's per-proxy fits and its trend lines (analysis.scaling), from its records."""
    from analysis.scaling import cells_markdown, load_scaling, trends_markdown

    fits, _ = load_scaling(_scaling_run(spec, results))
    return cells_markdown(fits) + "\n" + trends_markdown(fits)


def scaling_figure(spec: dict, out: Path, results: Path = RESULTS) -> Path:
    """The trends figure (alpha, beta against log parameters and log pairs) and, beside it with the
    suffix _cells, gold against sqrt(KL) per proxy with its fitted form."""
    from analysis.scaling import load_scaling, plot_cells, plot_trends

    fits, rows = load_scaling(_scaling_run(spec, results))
    plot_cells(fits, rows, out.with_name(out.stem + "_cells" + out.suffix))
    return plot_trends(fits, out)


TABLES = {"rl_seeds": rl_seeds_table, "bon_seeds": bon_seeds_table, "scaling_law": scaling_table,
          "rl_signals": signals_table, "composite_seeds": composite_seeds_table, "proxy_points": proxy_points_table,
          "benchmarks": benchmarks_table}
FIGURES = {"rl_seeds": rl_seeds_figure, "bon_seeds": bon_seeds_figure, "scaling_law": scaling_figure,
           "composite_seeds": composite_seeds_figure, "rl_frontier": rl_frontier_figure,
           "proxy_points": proxy_points_figure}


def config_reference() -> str:
    """Every config key (`rlhf_overopt.config.experiment.field_docs`, what `launch/train.py --list-keys`
    prints): one table per section, headed by the section dataclass's docstring."""
    import dataclasses
    import typing

    from rlhf_overopt.config.experiment import Config, field_docs

    hints = typing.get_type_hints(Config)
    sections = {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}
    groups: dict[str, list[tuple[str, str, object, str]]] = {}
    for key, tp, default, doc in field_docs():
        groups.setdefault(key.split(".")[0] if "." in key else "", []).append((key, tp, default, doc))
    lines = [f"{sum(map(len, groups.values()))} keys in {len(groups)} sections.", ""]
    for head, rows in groups.items():
        lines.append(f"## `{head}`" if head else "## Top level")
        doc = (sections[head].__doc__ or "").strip().split("\n\n")[0] if head else ""
        if doc and not doc.startswith(sections[head].__name__ + "("):  # not dataclass's generated signature
            lines += ["", _cell(" ".join(doc.split()))]
        lines += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{key}` | {_cell(tp)} | `{default!r}` | {_cell(doc)} |" for key, tp, default, doc in rows]
        lines.append("")
    return "\n".join(lines)


def _docstring_markdown(doc: str) -> list[str]:
    """A module docstring as Markdown: indented paragraphs (the maps) become code blocks."""
    lines, fence = [], False
    for line in doc.splitlines():
        indented = line.startswith("    ")
        if indented and not fence:
            lines.append("```")
            fence = True
        elif fence and line.strip() and not indented:
            while not lines[-1].strip():
                lines.pop()
            lines += ["```", ""]
            fence = False
        lines.append(line[4:] if fence else line)
    if fence:
        while lines and not lines[-1].strip():
            lines.pop()
        lines.append("```")
    return lines


def architecture_map(root: Path = ROOT) -> str:
    """The package's map, drawn from its own docstrings (read with ast, nothing imported): the package
    docstring without its title line, then one section per folder from the folder's `__init__.py`,
    and each driver of loops/ by its docstring's first line."""
    import ast

    def doc(path: Path) -> str:
        return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""

    pkg = root / "rlhf_overopt"
    lines = _docstring_markdown(doc(pkg / "__init__.py").split("\n", 2)[2])
    folders = sorted(p.parent for p in pkg.glob("*/__init__.py"))
    lines += ["", "## The folders"]
    for folder in folders:
        lines += ["", f"### `rlhf_overopt/{folder.name}/`", ""] + _docstring_markdown(doc(folder / "__init__.py"))
        if folder.name == "loops":
            lines += ["", "| driver | what it runs |", "|---|---|"]
            lines += [f"| `{f.name}` | {_cell(doc(f).splitlines()[0])} |" for f in sorted(folder.glob("*.py"))
                      if f.name != "__init__.py"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: code spans kept, `|` `<` `*` `_` escaped outside them."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = (parts[i].replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_")
                    .replace("<", "&lt;").replace(">", "&gt;"))
    return "`".join(parts).replace("|", "\\|")


def _markers(name: str, family: str = "results") -> tuple[str, str]:
    return f"<!-- {family}:{name} -->", f"<!-- /{family}:{name} -->"


def read_block(text: str, name: str, family: str = "results") -> str | None:
    """A page's text between a block's markers, or None when it has none."""
    start, end = _markers(name, family)
    if start not in text or end not in text:
        return None
    return text[text.index(start) + len(start):text.index(end)].strip("\n")


def replace_block(text: str, name: str, table: str, family: str = "results") -> str:
    start, end = _markers(name, family)
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + table.strip("\n") + "\n" + text[j:]


def generated_blocks(results: Path = RESULTS) -> list[tuple[str, str, str, dict | None]]:
    """(family, name, the block's text, the experiment's spec or None) for every generated block."""
    blocks = [("generated", "config", config_reference(), None),
              ("generated", "architecture", architecture_map(), None)]
    for name, spec in experiments(results).items():
        spec = {"name": name, **spec}
        blocks.append(("results", name, TABLES[spec["kind"]](spec, results), spec))
    return blocks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.results", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--collect", nargs="+", metavar=("NAME", "DIR"), help="copy run records into results/NAME")
    group.add_argument("--write", action="store_true", help="regenerate the pages' generated blocks and the figures")
    group.add_argument("--check", action="store_true", help="fail when a page under docs/ differs from what it is made from")
    parser.add_argument("--docs", default=str(DOCS), help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(RESULTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    results, docs = Path(args.results), Path(args.docs)
    if args.collect:
        name, *sources = args.collect
        copied = collect(name, sources, results)
        print(f"{len(copied)} run(s) recorded in {results / name}")
        return 0 if copied else 2
    pages = {p: p.read_text(encoding="utf-8") for p in sorted(docs.rglob("*.md"))}
    failures = []
    for family, name, table, spec in generated_blocks(results):
        start, end = _markers(name, family)
        holders = [p for p, text in pages.items() if read_block(text, name, family) is not None]
        where = ", ".join(str(p.relative_to(docs)) for p in holders)
        if len(holders) != 1:
            failures.append(f"{name}: {len(holders)} pages under {docs} hold a {start} ... {end} block"
                            + (f" ({where})" if holders else "") + "; exactly one must")
            continue
        page = holders[0]
        if args.write:
            pages[page] = replace_block(pages[page], name, table, family)
            if spec and spec.get("figure"):
                FIGURES[spec.get("figure_kind", spec["kind"])](spec, ROOT / spec["figure"], results)
        elif read_block(pages[page], name, family).strip() != table.strip():
            made_from = f"results/{name} gives" if spec else "the config dataclasses give"
            failures.append(f"{name}: the table in {where} differs from what {made_from} "
                            "(python -m analysis.results --write regenerates it)")
    if args.write:
        for page, text in pages.items():
            if text != page.read_text(encoding="utf-8"):
                page.write_text(text, encoding="utf-8")
    for f in failures:
        print(f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
