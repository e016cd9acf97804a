"""label_preferences: the shared pairing rule against hand-worked numbers, then the method through
its real command line on the tiny testbed (counts, flips, card; 2 ranks = 1 rank; a real kill
mid-run and resume = an uninterrupted run)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from rlhf_overopt.data.labeling import Pair, chunk_ranges, pair_and_label, rank_chunks

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "label_preferences.yaml"


# -- the pure pairing function -----------------------------------------------------------------------


def test_pairs_ties_and_order_two_responses():
    # prompt 0: 0.5 vs 0.2 -> (0, 1); prompt 1: exact tie -> dropped; prompt 2: -1 < 3 -> (5, 4);
    # prompt 3: 0.1 < 0.7 -> (7, 6)
    scores = [0.5, 0.2, 1.0, 1.0, -1.0, 3.0, 0.1, 0.7]
    pairs, ties = pair_and_label(scores, 2, noise=0.0, seed=0)
    assert ties == 1
    assert pairs == [Pair(0, 0, 1, False), Pair(2, 5, 4, False), Pair(3, 7, 6, False)]


def test_four_responses_give_two_disjoint_pairs_per_prompt():
    scores = [1, 2, 3, 4, 8, 7, 6, 5, 0, 9, 9, 0]  # 3 prompts x 4 responses
    pairs, ties = pair_and_label(scores, 4, noise=0.0, seed=0)
    assert ties == 0
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (0, 1, 0), (0, 3, 2), (1, 4, 5), (1, 6, 7), (2, 9, 8), (2, 10, 11)]
    # an odd count leaves the last response of each prompt out
    pairs3, _ = pair_and_label([1, 2, 99, 4, 3, 99], 3, noise=0.0, seed=0)
    assert [(p.chosen, p.rejected) for p in pairs3] == [(1, 0), (3, 4)]


def test_noise_flips_exactly_round_noise_times_pairs():
    scores = [0.5, 0.2, 1.0, 1.0, -1.0, 3.0, 0.1, 0.7]
    clean, _ = pair_and_label(scores, 2, noise=0.0, seed=7)
    noisy, ties = pair_and_label(scores, 2, noise=1 / 3, seed=7)
    assert ties == 1 and len(noisy) == 3
    flipped = [p for p in noisy if p.flipped]
    assert len(flipped) == 1
    (f,) = flipped
    assert scores[f.chosen] < scores[f.rejected]
    # the other pairs are untouched; the flipped one is its clean pair swapped
    k = noisy.index(f)
    assert (f.chosen, f.rejected) == (clean[k].rejected, clean[k].chosen)
    assert [p for i, p in enumerate(noisy) if i != k] == [p for i, p in enumerate(clean) if i != k]
    # same seed, same flips; the draw is random.Random(seed).sample over the pair indices
    assert pair_and_label(scores, 2, noise=1 / 3, seed=7) == (noisy, ties)
    assert k == random.Random(7).sample(range(3), 1)[0]


def _testbed_rule_before_sharing(scores, noise, seed):
    """The pairing the testbed's make_preferences did inline before pair_and_label existed."""
    rows, n_ties = [], 0
    for i in range(len(scores) // 2):
        a, b = 2 * i, 2 * i + 1
        if scores[a] == scores[b]:
            n_ties += 1
            continue
        win, lose = (a, b) if scores[a] > scores[b] else (b, a)
        rows.append({"i": i, "chosen": win, "rejected": lose, "flipped": False})
    for k in random.Random(seed).sample(range(len(rows)), round(noise * len(rows))):
        r = rows[k]
        r["chosen"], r["rejected"], r["flipped"] = r["rejected"], r["chosen"], True
    return [(r["i"], r["chosen"], r["rejected"], r["flipped"]) for r in rows], n_ties


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_shared_rule_equals_the_testbeds_old_one(seed):
    rng = random.Random(seed)
    scores = [float(rng.choice([-2.0, -1.5, 0.0, rng.random()])) for _ in range(2 * 101)]
    pairs, ties = pair_and_label(scores, 2, noise=0.25, seed=seed + 2)
    assert ([(p.prompt, p.chosen, p.rejected, p.flipped) for p in pairs], ties) == \
        _testbed_rule_before_sharing(scores, 0.25, seed + 2)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        pair_and_label([1.0, 2.0], 1, noise=0.0, seed=0)
    with pytest.raises(ValueError):
        pair_and_label([1.0, 2.0, 3.0], 2, noise=0.0, seed=0)


def test_both_writers_name_their_columns_from_the_one_preference_schema():
    from rlhf_overopt.data.labeling import COLUMNS
    from rlhf_overopt.data.preferences import (
        PREFERENCE_COLUMNS,
        TESTBED_NAMES,
        column_of,
        normalize_preferences,
    )
    from rlhf_overopt.testbed.data import PREF_COLUMNS

    assert set(COLUMNS) == {"prompt_index", *PREFERENCE_COLUMNS}
    assert PREF_COLUMNS[1:-2] == tuple(TESTBED_NAMES.get(c, c) for c in PREFERENCE_COLUMNS)
    # readers find a schema column under its name or the testbed's spelling, and nowhere else
    assert column_of(COLUMNS, "gold_chosen") == "gold_chosen"
    assert column_of(PREF_COLUMNS, "gold_chosen") == "chosen_gold"
    assert column_of(PREF_COLUMNS, "flipped") == "label_flipped" and column_of(["prompt"], "flipped") is None
    testbed_row = {"prompt": ["p"], "chosen": [" a"], "rejected": [" b"], "chosen_gold": [1.0],
                   "rejected_gold": [0.0], "label_flipped": [False]}
    normalized = normalize_preferences(datasets.Dataset.from_dict(testbed_row))
    assert set(normalized.column_names) == {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "flipped"}


def test_chunks_cover_the_prompts_contiguously_over_ranks():
    chunks = chunk_ranges(10, 3)
    assert [list(c) for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    for world in (1, 2, 3, 5, 7):
        shares = [rank_chunks(len(chunks), r, world) for r in range(world)]
        assert [c for s in shares for c in s] == list(range(len(chunks)))


# -- the method through its command line -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(out: Path, cache: Path, *args: str, launcher: list[str] | None = None) -> list[str]:
    # One torch thread in every run: 1-rank and 2-rank runs then do the same arithmetic.
    return [*(launcher or [sys.executable]), str(ROOT / "launch" / "train.py"), "--config", str(TINY),
            f"testbed.cache_dir={cache}", f"output_dir={out}", "num_threads=1", *args]


def label(out: Path, cache: Path, *args: str, launcher: list[str] | None = None):
    result = subprocess.run(_cmd(out, cache, *args, launcher=launcher), check=False, cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def rows(run: Path) -> dict[str, list]:
    return datasets.load_from_disk(str(run / "preferences")).to_dict()


@pytest.fixture(scope="module")
def label_run(tmp_path_factory, tiny_testbed):
    out = tmp_path_factory.mktemp("label") / "run"
    label(out, tiny_testbed.root.parent)
    return out


@pytest.mark.slow
def test_cli_writes_dataset_card_and_stats(label_run, tiny_testbed_config):
    import yaml

    lab = yaml.safe_load(TINY.read_text())["label"]
    ds = datasets.load_from_disk(str(label_run / "preferences"))
    for col in ("prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "flipped", "chosen_ended",
                "rejected_ended"):
        assert col in ds.column_names
    stats = json.loads((label_run / "preferences" / "stats.json").read_text())
    n_prompts, r = lab["max_prompts"], lab["responses_per_prompt"]
    assert stats["n_prompts"] == n_prompts and stats["n_responses"] == n_prompts * r
    assert stats["n_pairs"] == len(ds) > 0
    assert stats["n_pairs"] + stats["n_ties_dropped"] == n_prompts * r // 2
    n_flip = round(lab["noise"] * len(ds))
    assert sum(ds["flipped"]) == stats["n_flipped"] == n_flip
    assert stats["flipped_fraction"] == n_flip / len(ds)
    # the flipped pairs are exactly those whose chosen has the lower gold
    for c, rj, f in zip(ds["gold_chosen"], ds["gold_rejected"], ds["flipped"]):
        assert (c < rj) == f and c != rj
    assert stats["clean_agreement"] == 1 - n_flip / len(ds)
    # the gold columns are the gold of the texts in the row
    from rlhf_overopt.testbed.gold import TestbedGold

    gold = TestbedGold.from_config(tiny_testbed_config)
    assert gold.score(ds["prompt"], ds["chosen"], ds["chosen_ended"]).tolist() == pytest.approx(ds["gold_chosen"])
    assert gold.score(ds["prompt"], ds["rejected"], ds["rejected_ended"]).tolist() == \
        pytest.approx(ds["gold_rejected"])
    card = (label_run / "preferences" / "README.md").read_text()
    assert "clean agreement" in card and "ties dropped" in card and "q50" in card
    summary = json.loads((label_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["n_pairs"] == len(ds)
    assert summary["dataset"] == str(label_run / "preferences")
    assert len(list((label_run / "preferences_chunks").glob("chunk*.json"))) == -(-n_prompts // lab["chunk_prompts"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_ranks_give_the_one_rank_dataset(label_run, tiny_testbed, tmp_path):
    out = tmp_path / "run2"
    label(out, tiny_testbed.root.parent,
          launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())])
    assert rows(out) == rows(label_run)
    assert json.loads((out / "preferences" / "stats.json").read_text()) == \
        json.loads((label_run / "preferences" / "stats.json").read_text())
    ranks = {json.loads(p.read_text())["rank"] for p in (out / "preferences_chunks").glob("chunk*.json")}
    assert ranks == {0, 1}  # both ranks sampled a share


@pytest.mark.slow
def test_kill_then_resume_equals_uninterrupted(tiny_testbed, tmp_path):
    cache = tiny_testbed.root.parent
    # many one-prompt chunks, so that a kill after the first one lands mid-run
    small = ("label.chunk_prompts=1", "label.max_prompts=32", "label.responses_per_prompt=4", "label.batch_size=1")
    whole = tmp_path / "whole"
    label(whole, cache, *small)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(out, cache, *small), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    chunks = out / "preferences_chunks"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(chunks.glob("chunk*.json")):
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(chunks.glob("chunk*.json")))
    assert 1 <= done < 32, f"the kill did not land mid-run ({done} of 32 chunks)"
    assert not (out / "preferences").exists()

    result = label(out, cache, *small, "resume=true")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["chunks_resumed"] == done, result.stdout[-2000:]
    assert rows(out) == rows(whole)
    assert (out / "preferences" / "stats.json").read_text() == (whole / "preferences" / "stats.json").read_text()
