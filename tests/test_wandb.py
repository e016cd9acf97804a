"""W&B: what a real offline run logged, read back from its run-*.wandb record log.

The tiny PPO config runs with wandb.mode=offline; the test parses the offline run's file
(tests/wandb_records.py) and compares it with the run directory, the source of truth: history
rows against curves.jsonl, the config against config.yaml, samples tables against samples.jsonl.
The analysis report's --wandb upload is checked the same way.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import yaml
from wandb_records import WandbLogError, find_offline_runs, iter_record_bytes, read_offline_run

from analysis.report import main as report_main
from rlhf_overopt.run.directory import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "ppo_ensemble.yaml"


@pytest.fixture(scope="module")
def offline_run(tiny_ppo_run) -> Path:
    """The session's tiny PPO run (tests/conftest.py), made with wandb.mode=offline, name tiny-wandb,
    project overopt-tests, group tiny-group; read-only."""
    return tiny_ppo_run


@pytest.mark.slow
def test_offline_history_equals_curves_jsonl(offline_run: Path) -> None:
    (path,) = find_offline_runs(offline_run / "wandb")
    run = read_offline_run(path)
    assert run.exited
    assert (run.project, run.group, run.name, run.job_type) == ("overopt-tests", "tiny-group", "tiny-wandb", "ppo")
    curves = read_jsonl(offline_run / "curves.jsonl")
    logged = run.rows_with("gold_score", "proxy_score", "sqrt_kl")
    assert len(logged) == len(curves) == 3
    for row, curve in zip(logged, curves):
        for key in ("step", "gold_score", "proxy_score", "sqrt_kl", "kl"):
            assert row[key] == curve[key], key  # JSON both ways: exactly the same floats
        members = [row[f"proxy_member/{i}"] for i in range(len(curve["proxy_member_scores"]))]
        assert members == curve["proxy_member_scores"]
    # gold, proxy, KL and every member are charted against sqrt_kl
    for key in ("gold_score", "proxy_score", "kl", "proxy_member/*"):
        assert run.metrics[key]["step_metric"] == "sqrt_kl", key
    assert run.summary["gold_score"] == curves[-1]["gold_score"]
    # training statistics were logged too, against their own step
    train = run.rows_with("train/step")
    assert [r["train/step"] for r in train] == [r["step"] for r in read_jsonl(offline_run / "train_stats.jsonl")]


@pytest.mark.slow
def test_offline_config_and_samples_tables(offline_run: Path) -> None:
    run = read_offline_run(find_offline_runs(offline_run / "wandb")[0])
    stored = yaml.safe_load((offline_run / "config.yaml").read_text())
    stored.pop("_meta")
    assert run.config == stored
    assert run.config["ppo"]["kl_coef"] == 0.01 and run.config["aggregate"]["name"] == "uwo"

    samples = read_jsonl(offline_run / "samples.jsonl")
    for step in (0, 2, 4):
        (row,) = run.rows_with(f"samples/step_{step}")
        value = row[f"samples/step_{step}"]
        assert value["_type"] == "table-file"
        table = run.table(value)
        expected = [s for s in samples if s["step"] == step]
        assert value["nrows"] == len(table["data"]) == len(expected) > 0
        cells = [dict(zip(table["columns"], r)) for r in table["data"]]
        assert [c["response"] for c in cells] == [s["response"] for s in expected]
        assert [c["gold_score"] for c in cells] == [s["gold_score"] for s in expected]


@pytest.mark.slow
def test_report_upload_lands_in_the_runs_group(offline_run: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "report"
    assert report_main([str(offline_run), "--out", str(out), "--wandb"]) == 0
    import wandb

    wandb.teardown()  # in-process, the wandb-core service finishes writing the log when it shuts down
    (path,) = find_offline_runs(out)
    run = read_offline_run(path)
    assert (run.project, run.group, run.job_type, run.name) == ("overopt-tests", "tiny-group", "analysis",
                                                                "tiny-group-report")
    (row,) = run.rows_with("overoptimization_table")
    for name in ("curves_ppo", "frontier_ppo"):
        assert row[f"figures/{name}"]["_type"] == "image-file"
        assert (run.files_dir / row[f"figures/{name}"]["path"]).stat().st_size > 1000
    table = run.table(row["overoptimization_table"])
    assert len(table["data"]) == 1 and "fit_alpha" in table["columns"]
    frontier = run.table(row["frontier_table"])
    assert dict(zip(frontier["columns"], frontier["data"][0]))["aggregator"] == "uwo"


def test_reader_rejects_other_files_and_checks_checksums(tmp_path: Path) -> None:
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb log")
    with pytest.raises(WandbLogError, match="not a wandb record log"):
        list(iter_record_bytes(bad))
    # header + one FULL chunk of b"hi" with a wrong checksum
    bad.write_bytes(b":W&B\xe1\xbe\x00" + (123).to_bytes(4, "little") + (2).to_bytes(2, "little") + b"\x01hi")
    with pytest.raises(WandbLogError, match="checksum"):
        list(iter_record_bytes(bad))
    crc = zlib.crc32(b"hi", zlib.crc32(b"\x01")) & 0xFFFFFFFF
    good = b":W&B\xe1\xbe\x00" + crc.to_bytes(4, "little") + (2).to_bytes(2, "little") + b"\x01hi"
    bad.write_bytes(good + b"\x00\x00")  # a torn tail after the last record is ignored
    assert list(iter_record_bytes(bad)) == [b"hi"]
