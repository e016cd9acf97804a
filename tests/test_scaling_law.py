"""method scaling_law (Gao et al. 2022 §3.2): the pure fits on hand-worked numbers, parameter
counting, config errors, and the method through its real command line on the tiny testbed —
rows, report, a given pool, and a resumed run that reuses the pool and skips finished cells."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_overopt.config.load import load_config
from rlhf_overopt.errors import ConfigError
from rlhf_overopt.ops.scaling import (
    bon_peak,
    bon_peak_gain,
    fit_bon_form,
    fit_log_linear,
    gpt2_reward_parameters,
    non_embedding_parameters,
)
from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "scaling_law.yaml"


# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------


def test_log_linear_fit_on_hand_worked_numbers():
    # log10 x = [0, 1, 2], y = [1, 3, 4]: b = sum (lx - 1)(y - 8/3) / sum (lx - 1)^2 = 3 / 2,
    # a = 8/3 - 3/2 = 7/6; predictions 7/6, 8/3, 25/6, SS_res = 1/36 + 4/36 + 1/36 = 1/6,
    # SS_tot = (25 + 1 + 16)/9 = 14/3, R^2 = 1 - (1/6)/(14/3) = 27/28.
    fit = fit_log_linear([1.0, 10.0, 100.0], [1.0, 3.0, 4.0])
    assert fit.a == pytest.approx(7 / 6)
    assert fit.b == pytest.approx(1.5)
    assert fit.r2 == pytest.approx(27 / 28)
    two = fit_log_linear([100.0, 1000.0], [0.5, 0.2])  # two points: exact, slope -0.3 per decade
    assert two.b == pytest.approx(-0.3) and two.a == pytest.approx(1.1) and two.r2 == pytest.approx(1.0)
    assert math.isnan(fit_log_linear([1.0, 10.0, 100.0], [2.0, 2.0, 2.0]).r2)  # constant y: R^2 undefined
    with pytest.raises(ValueError, match="positive"):
        fit_log_linear([0.0, 10.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="identifiable"):
        fit_log_linear([10.0, 10.0], [1.0, 2.0])


def test_bon_form_fit_peak_and_gain_on_hand_worked_numbers():
    # d = [1, 2], r = [1, 0]: alpha - beta = 1 and 2 alpha - 4 beta = 0, so alpha = 2, beta = 1;
    # d* = alpha / (2 beta) = 1, gain there alpha^2 / (4 beta) = 1.
    fit = fit_bon_form([1.0, 2.0], [1.0, 0.0])
    assert (fit.alpha, fit.beta) == (pytest.approx(2.0), pytest.approx(1.0))
    assert bon_peak(fit.alpha, fit.beta) == pytest.approx(1.0)
    assert bon_peak_gain(fit.alpha, fit.beta) == pytest.approx(1.0)
    d = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0])
    exact = fit_bon_form(d, d * (0.8 - 0.3 * d))  # points on the form: recovered, R^2 = 1
    assert (exact.alpha, exact.beta, exact.r2) == (pytest.approx(0.8), pytest.approx(0.3), pytest.approx(1.0))
    assert bon_peak(0.5, 0.0) == math.inf and bon_peak(0.5, -0.1) == math.inf  # beta <= 0: no peak in the form
    assert bon_peak_gain(0.5, -0.1) == math.inf and bon_peak_gain(-0.5, 0.2) == 0.0
    with pytest.raises(ValueError, match="identifiable"):
        fit_bon_form([0.0, 1.0], [0.0, 0.3])  # one non-zero d cannot fix both coefficients


def test_bon_form_fit_recovers_known_coefficients_and_states_its_nonfinite_policy():
    # data generated from alpha = 0.7, beta = 0.2: the fit returns them with R^2 = 1
    d = [0.5, 1.0, 2.0, 3.0]
    r = [di * (0.7 - 0.2 * di) for di in d]  # 0.3, 0.5, 0.6, 0.3
    fit = fit_bon_form(d, r)
    assert (fit.alpha, fit.beta, fit.r2) == (pytest.approx(0.7), pytest.approx(0.2), pytest.approx(1.0))
    # a hole in a curve read back from disk: "skip" fits the finite points, the default raises
    holed_d, holed_r = [*d, math.nan, 4.0], [*r, 0.1, math.inf]
    assert fit_bon_form(holed_d, holed_r, nonfinite="skip") == fit
    with pytest.raises(ValueError, match="non-finite"):
        fit_bon_form(holed_d, holed_r)
    with pytest.raises(ValueError, match="nonfinite"):
        fit_bon_form(d, r, nonfinite="drop")


@pytest.mark.parametrize("n_layer,n_embd,n_head,vocab,positions", [(1, 32, 1, 400, 128), (3, 48, 2, 1025, 64)])
def test_parameter_count_matches_the_model(n_layer, n_embd, n_head, vocab, positions):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        num_labels=1, pad_token_id=0)
    model = GPT2ForSequenceClassification(config)
    assert gpt2_reward_parameters(n_layer, n_embd, vocab, positions) == sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for name, p in model.named_parameters() if ".h." in name or ".ln_f." in name)
    assert non_embedding_parameters(n_layer, n_embd) == blocks


# ---------------------------------------------------------------------------------------------
# Config: one clear error before work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,key", [
    ("scaling.proxy_sizes=[]", "scaling.proxy_sizes"),
    ("scaling.train_pairs=[]", "scaling.train_pairs"),
    ("scaling.proxy_sizes=[{n_layer: 0, n_embd: 32}]", "scaling.proxy_sizes[0].n_layer"),
    ("scaling.proxy_sizes=[{n_layer: 1, n_embd: 32}, {n_layer: 1, n_embd: -8}]", "scaling.proxy_sizes[1].n_embd"),
    ("scaling.proxy_sizes=[{n_layer: 1, n_embd: 48, n_head: 5}]", "scaling.proxy_sizes[0].n_embd"),
    ("scaling.proxy_sizes=[{n_layer: 1, n_embd: 32, width: 2}]", "scaling.proxy_sizes[0].width"),
    ("scaling.proxy_sizes=[{n_layer: 1, n_embd: 32}, {n_layer: 1, n_embd: 32, n_head: 1}]", "scaling.proxy_sizes"),
    ("scaling.train_pairs=[-5]", "scaling.train_pairs[0]"),
    ("scaling.train_pairs=[100, 100]", "scaling.train_pairs"),
    ("scaling.train_pairs=[100, 6000]", "scaling.train_pairs[1]"),  # > 90% of testbed.n_train_prompts
    ("scaling.n_grid=[512]", "scaling.n_grid[0]"),
    ("proxy.train_pairs=100", "proxy.train_pairs"),
    ("proxy.n_layer=1", "proxy.n_layer"),
    ("proxy.kind=multihead", "proxy.kind"),
    ("proxy.on_failed_member=drop", "proxy.on_failed_member"),
])
def test_bad_grid_is_one_clear_error(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["method=scaling_law", override], check_paths=False)
    message = str(info.value)
    assert message.startswith(f"{key}:") and "\n" not in message


def test_the_configs_load():
    cfg = load_config(str(TINY), [], check_paths=False)
    assert [(s.n_layer, s.n_embd, s.heads) for s in cfg.scaling.proxy_sizes] == [(1, 32, 1), (1, 64, 2)]
    cfg = load_config(str(ROOT / "configs" / "scaling_law.yaml"), [], check_paths=False)
    assert len(cfg.scaling.proxy_sizes) * len(cfg.scaling.train_pairs) == 12 and cfg.scaling.pool == ""  # samples its pool


# ---------------------------------------------------------------------------------------------
# The method through its command line on the tiny testbed
# ---------------------------------------------------------------------------------------------


def _train(tiny_testbed, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(TINY), f"output_dir={out}",
           f"testbed.cache_dir={tiny_testbed.root.parent}", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


@pytest.mark.slow
def test_scaling_law_cli_rows_report_and_resume(tiny_testbed, tmp_path):
    out = tmp_path / "run"
    result = _train(tiny_testbed, out)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_jsonl(out / "curves.jsonl")
    cells = {r["aggregator"] for r in rows}
    assert len(cells) == 4  # 2 sizes x 2 data sizes
    assert sorted({r["n"] for r in rows}) == [1, 2, 4, 8, 16]
    for r in rows:
        assert all(k in r for k in CURVE_REQUIRED_KEYS)
        assert {"n_layer", "n_embd", "params", "train_pairs", "proxy_val_accuracy", "sqrt_kl", "n"} <= set(r)
        assert r["kl"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"])
    n1 = {r["gold_score"] for r in rows if r["n"] == 1}
    assert max(n1) - min(n1) < 1e-6  # n = 1 is the pool's mean gold whichever proxy ranks it
    for label in cells:
        curve = sorted((r for r in rows if r["aggregator"] == label), key=lambda r: r["n"])
        assert all(b["proxy_score"] >= a["proxy_score"] - 1e-6 for a, b in itertools.pairwise(curve))

    results = json.loads((out / "scaling.json").read_text())
    pairs = sorted({c["train_pairs"] for c in results["cells"]})
    assert len(pairs) == 2 and pairs[0] == 40 < pairs[1]  # 0 resolved to the train split's size
    for c in results["cells"]:  # parameters counted on the model = the GPT-2 formula at its vocabulary
        assert c["params"] == gpt2_reward_parameters(c["n_layer"], c["n_embd"], c["vocab_rows"], 128)
        assert c["alpha"] is not None and 0.0 <= c["proxy_val_accuracy"] <= 1.0
    assert {(t["coefficient"], t["against"]) for t in results["trends"]} == {
        ("alpha", "params"), ("beta", "params"), ("alpha", "train_pairs"), ("beta", "train_pairs")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["scaling"]["cells"] == 4
    assert len(summary["scaling"]["trend_r2"]) == len(results["trends"])
    for name in ("table.md", "trends.md", "gold_vs_sqrt_kl.png", "trends.png"):
        assert (out / "report" / name).stat().st_size > 0, name
    table = (out / "report" / "table.md").read_text()
    assert table.count("\n| L1-d") == 4 and "α" in table

    # An interrupted run: one cell unfinished, no curves or summary yet. Resumed, it reuses the
    # pool and the finished cells' scores, and redoes only the unfinished cell.
    cell_dirs = sorted((out / "cells").iterdir())
    assert len(cell_dirs) == 4
    stamps = {p: (p / "scores.safetensors").stat().st_mtime_ns for p in cell_dirs}
    pool_stamp = (out / "pool" / "dataset_info.json").stat().st_mtime_ns
    (cell_dirs[-1] / "cell.json").unlink()
    (out / "curves.jsonl").unlink()
    (out / "scaling.json").unlink()
    (out / "summary.json").write_text(json.dumps({"status": "running"}))
    again = _train(tiny_testbed, out, "resume=true")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "reusing the gold-scored pool" in again.stderr
    assert again.stderr.count(": reusing its scores") == 3
    assert (out / "pool" / "dataset_info.json").stat().st_mtime_ns == pool_stamp
    for p in cell_dirs[:-1]:
        assert (p / "scores.safetensors").stat().st_mtime_ns == stamps[p]
    assert (cell_dirs[-1] / "cell.json").exists()
    assert read_jsonl(out / "curves.jsonl") == rows  # same scores, same rows
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"

    # The saved pool as scaling.pool of a new run: same prompts and gold, so the same n = 1 point.
    given = _train(tiny_testbed, tmp_path / "given", f"scaling.pool={out / 'pool'}", "scaling.train_pairs=[40]")
    assert given.returncode == 0, given.stderr[-4000:]
    rows_given = read_jsonl(tmp_path / "given" / "curves.jsonl")
    assert {r["gold_score"] for r in rows_given if r["n"] == 1} == pytest.approx([min(n1)])
    assert len({r["aggregator"] for r in rows_given}) == 2


@pytest.mark.slow
def test_more_pairs_than_the_train_split_fails_before_work(tiny_testbed, tmp_path):
    # 100 passes the config check (<= 90% of 128 train prompts) but the tiny testbed's train split
    # holds fewer pairs (tied responses make none): the driver refuses before any pool or proxy.
    out = tmp_path / "run"
    result = _train(tiny_testbed, out, "scaling.train_pairs=[40, 100]", timeout=300)
    assert result.returncode == 2
    assert "scaling.train_pairs[1]: 100 exceeds the" in result.stderr
    assert not (out / "pool").exists() and not (out / "cells").exists()
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
