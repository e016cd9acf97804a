"""The bad-input catalogue: every case ends with exit status 2 and one clear line naming the
problem, and an existing run directory beside it is left byte-for-byte as it was.

Config-level cases call launch/train.py's main() in-process (they fail before any work); data,
model and runtime cases run the real command line on the tiny testbed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_PPO = ROOT / "configs" / "tiny" / "ppo_ensemble.yaml"
TINY_BON = ROOT / "configs" / "tiny" / "bon_ensemble.yaml"
TINY_DPO = ROOT / "configs" / "tiny" / "dpo.yaml"
TINY_CONSTRAINED = ROOT / "configs" / "tiny" / "constrained_ppo.yaml"
TINY_DYNAMIC = ROOT / "configs" / "tiny" / "dynamic_weighting.yaml"


def _train_module():
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = _train_module()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_run(tmp_path):
    """A completed run directory that no failing command may touch."""
    cfg = TRAIN.load_config(TINY_BON, [f"output_dir={tmp_path / 'done'}"])
    from rlhf_overopt.config.experiment import dump_yaml

    root = tmp_path / "done"
    root.mkdir()
    (root / "config.yaml").write_text(dump_yaml(cfg))
    (root / "curves.jsonl").write_text('{"method": "bon", "step": 1}\n')
    (root / "summary.json").write_text('{"status": "completed"}\n')
    return root


# (case id, config file, overrides, extra environment, text the single error line must contain)
CONFIG_CASES = [
    ("unknown-key", TINY_PPO, ["ppo.kl_coeff=0.1"], {}, "ppo.kl_coeff: unknown key"),
    ("unknown-section", TINY_PPO, ["optimizer.lr=1"], {}, "optimizer: unknown key"),
    ("wrong-type-int", TINY_PPO, ["ppo.steps=many"], {}, "ppo.steps: expected an integer"),
    ("wrong-type-float", TINY_PPO, ["ppo.lr=fast"], {}, "ppo.lr: expected a number"),
    ("wrong-type-bool", TINY_PPO, ["ppo.adaptive_kl=yes please"], {}, "ppo.adaptive_kl: expected true or false"),
    ("wrong-type-list", TINY_BON, ["bon.n_grid=4"], {}, "bon.n_grid: expected a list"),
    ("negative-size", TINY_PPO, ["ppo.steps=-3"], {}, "ppo.steps: must be positive"),
    ("zero-size", TINY_PPO, ["ppo.batch_size=0"], {}, "ppo.batch_size: must be positive"),
    ("zero-members", TINY_PPO, ["proxy.k=0"], {}, "proxy.k: must be positive"),
    ("too-few-proxy-pairs", TINY_BON, ["proxy.train_pairs=5"], {}, "proxy.train_pairs: must be 0 (all pairs) or at least 20"),
    ("n-above-pool", TINY_BON, ["bon.n_grid=[1,64]"], {}, "bon.n_grid[1]: n=64 must be between 1 and bon.pool_size"),
    ("batch-not-divisible-by-ranks", TINY_PPO, [], {"WORLD_SIZE": "3"}, "cannot be split evenly over 3 ranks"),
    ("minibatch-does-not-divide-batch", TINY_PPO, ["ppo.mini_batch_size=3"], {}, "ppo.mini_batch_size: must divide"),
    ("member-out-of-range", TINY_PPO, ["aggregate.name=member_7"], {}, "member_7 is out of range"),
    ("unknown-aggregator", TINY_PPO, ["aggregate.name=max"], {}, "aggregate.name: unknown aggregator 'max'"),
    ("unknown-method", TINY_PPO, ["method=sft"], {}, "method: must be one of"),
    ("probability-above-one", TINY_PPO, ["eval.top_p=1.5"], {}, "eval.top_p: must be in (0, 1]"),
    ("label-noise-above-one", TINY_PPO, ["testbed.label_noise=2"], {}, "testbed.label_noise: must be in [0, 1]"),
    ("non-finite-number", TINY_PPO, ["ppo.kl_coef=.inf"], {}, "ppo.kl_coef: must be finite"),
    ("missing-policy", TINY_PPO, ["policy.path=/no/such/model"], {}, "policy.path: no such model directory"),
    ("missing-gold", TINY_PPO, ["gold.path=./no_gold_here"], {}, "gold.path: no such model directory"),
    ("missing-proxies", TINY_PPO, ["proxy.path=/no/such/ensemble"], {}, "proxy.path: no such directory"),
    ("missing-dataset", TINY_DPO, ["dpo.dataset=/no/such/prefs"], {}, "dpo.dataset: no such dataset path"),
    ("missing-deepspeed-json", TINY_PPO, ["deepspeed.config=missing.json"], {}, "deepspeed.config: file not found"),
    ("override-without-value", TINY_PPO, ["ppo.steps"], {}, "ppo.steps: an override must look like key.sub=value"),
    ("prompt-too-long-for-context", TINY_PPO, ["ppo.max_new_tokens=4000"], {}, "max_new_tokens"),
    ("conflicting-tier-and-user-dataset", TINY_DPO, ["dpo.dataset=/no/such/prefs", "dpo.quality=low"], {},
     "dpo.quality: quality tiers are built from the testbed's preferences"),
    ("objective-not-a-component", TINY_CONSTRAINED, ["constrained.objective=brevity"], {},
     "constrained.objective: must be 'kl' or a component name"),
    ("weights-do-not-match-components", TINY_DYNAMIC, ["weighting.weights=[0.5,0.3,0.2]"], {},
     "weighting.weights: needs 2 non-negative weights"),
]


@pytest.mark.parametrize("case, config, overrides, env, expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_case(case, config, overrides, env, expected, existing_run, tmp_path, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = tree_digest(existing_run)
    out = tmp_path / "new_run"
    status = TRAIN.main(["--config", str(config), f"output_dir={out}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("config error: ") and expected in err[0], err
    assert not out.exists()  # nothing created before the error
    assert tree_digest(existing_run) == before


def test_missing_config_file_and_non_utf8(tmp_path, capsys):
    assert TRAIN.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config: file not found" in capsys.readouterr().err
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert TRAIN.main(["--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_existing_run_is_refused_and_untouched(existing_run, capsys):
    before = tree_digest(existing_run)
    assert TRAIN.main(["--config", str(TINY_BON), f"output_dir={existing_run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert TRAIN.main(["--config", str(TINY_BON), f"output_dir={existing_run}", "resume=true", "proxy.k=2"]) == 2
    assert "proxy.k: differs from the run being resumed" in capsys.readouterr().err
    assert tree_digest(existing_run) == before


# ---- data, model and runtime cases through the real command line --------------------------------


def run_cli(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config), *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_clean_failure(result: subprocess.CompletedProcess, out: Path, expected: str, *,
                         before_run_dir: bool = False) -> None:
    """Exit 2 with one error line; the run directory records the failure, or (`before_run_dir`: the
    input was read while the run's identity was computed, before the directory is made) does not exist."""
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if before_run_dir:
        assert not out.exists()
        return
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and expected in summary["error"]


@pytest.fixture(scope="module")
def tiny_models(tiny_testbed, tmp_path_factory):
    """A policy whose tokenizer lacks a pad token, one with a mismatched vocabulary, and a copy
    of the tiny proxy ensemble whose standardization makes every score NaN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("bad_models")
    no_pad = root / "no_pad"
    shutil.copytree(tiny_testbed.policy_dir, no_pad)
    tok = AutoTokenizer.from_pretrained(no_pad)
    tok.pad_token = None
    tok.save_pretrained(no_pad)
    small_vocab = root / "small_vocab"
    model = AutoModelForCausalLM.from_pretrained(tiny_testbed.policy_dir)
    model.resize_token_embeddings(64)
    model.save_pretrained(small_vocab)
    AutoTokenizer.from_pretrained(tiny_testbed.policy_dir).save_pretrained(small_vocab)
    return {"no_pad": no_pad, "small_vocab": small_vocab}


@pytest.fixture(scope="module")
def nan_proxies(tiny_testbed, tmp_path_factory):
    """Train (or reuse) the tiny ensemble through train_rm, then poison a copy's statistics."""
    out = tmp_path_factory.mktemp("train_rm") / "run"
    result = run_cli(ROOT / "configs" / "tiny" / "train_rm.yaml", f"output_dir={out}",
                     f"testbed.cache_dir={tiny_testbed.root.parent}")
    assert result.returncode == 0, result.stderr[-3000:]
    source = Path(json.loads((out / "proxies.json").read_text())["path"])
    poisoned = tmp_path_factory.mktemp("nan") / "ensemble"
    shutil.copytree(source, poisoned)
    meta = json.loads((poisoned / "ensemble.json").read_text())
    meta["score_mean"] = [float("nan")] * len(meta["score_mean"])
    (poisoned / "ensemble.json").write_text(json.dumps(meta))
    return poisoned


@pytest.mark.slow
def test_tokenizer_without_pad_token_gets_one(tiny_testbed, tiny_models, tmp_path):
    """A policy whose tokenizer pads with EOS (Pythia, Llama) gets a pad token added and its
    embeddings grown, said in the log, instead of stopping."""
    out = tmp_path / "run"
    result = run_cli(TINY_BON, f"output_dir={out}", f"testbed.cache_dir={tiny_testbed.root.parent}",
                     f"policy.path={tiny_models['no_pad']}", "gold.path=testbed", "data.prompts=testbed",
                     "proxy.dataset=testbed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "padding with <|pad|>" in result.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_mismatched_vocabulary(tiny_testbed, tiny_models, tmp_path):
    out = tmp_path / "run"
    result = run_cli(TINY_BON, f"output_dir={out}", f"testbed.cache_dir={tiny_testbed.root.parent}",
                     f"policy.path={tiny_models['small_vocab']}", "gold.path=testbed", "data.prompts=testbed",
                     "proxy.dataset=testbed")
    assert_clean_failure(result, out, "mismatched vocabulary")


@pytest.mark.slow
def test_proxy_returning_nan_stops_at_that_step(tiny_testbed, nan_proxies, tmp_path):
    out = tmp_path / "run"
    result = run_cli(TINY_PPO, f"output_dir={out}", f"testbed.cache_dir={tiny_testbed.root.parent}",
                     f"proxy.path={nan_proxies}", "proxy.k=2", "aggregate.name=mean")
    assert_clean_failure(result, out, "step 0: proxy member 0 score is not finite")
    assert not (out / "curves.jsonl").exists()  # no NaN curve was written


GOOD_ROW = {"prompt": "The film was", "chosen": " great.", "rejected": " bad."}
# (case id, file name, its bytes, text the single error line must contain)
DATA_CASES = [
    ("missing-column", "prefs.jsonl", b'{"prompt": "The film was", "chosen": " great."}\n',
     "missing column(s) rejected"),
    ("empty-dataset", "prefs.csv", b"prompt,chosen,rejected\n", "holds no rows"),
    ("row-missing-a-field", "prefs.jsonl",
     b'{"prompt": "The film was", "chosen": " great.", "rejected": " bad."}\n{"prompt": "It was", "rejected": " dull."}\n',
     "row 1: field 'chosen' is missing"),
    ("empty-prompt", "prefs.jsonl", b'{"prompt": "   ", "chosen": " great.", "rejected": " bad."}\n',
     "row 0: field 'prompt' is empty"),
    ("message-list-not-text", "prefs.jsonl",
     b'{"prompt": "The film was", "chosen": [{"role": "assistant", "content": "great"}], "rejected": " bad."}\n',
     "row 0: field 'chosen' must be a string"),
    ("non-utf8-text", "prefs.jsonl", b'{"prompt": "The film was", "chosen": " gr\xe9at.", "rejected": " bad."}\n',
     "line 1: not valid UTF-8 text"),
    ("malformed-json", "prefs.jsonl", b'{"prompt": "The film was", "chosen": " great." "rejected": " bad."}\n',
     "cannot be read as json"),
    ("unsupported-file-type", "prefs.txt", b"The film was great.\n", "unsupported file type '.txt'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, filename, content, expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_preference_data(case, filename, content, expected, tiny_testbed, existing_run, tmp_path):
    """Bad user preference data stops the run before training with one line naming the file, the
    row (or line) and the field; the run directory records the failure."""
    before = tree_digest(existing_run)
    data = tmp_path / filename
    data.write_bytes(content)
    out = tmp_path / "run"
    result = run_cli(TINY_DPO, f"output_dir={out}", f"testbed.cache_dir={tiny_testbed.root.parent}",
                     f"dpo.dataset={data}")
    assert_clean_failure(result, out, expected)
    assert "dpo.dataset" in result.stderr
    assert not (out / "curves.jsonl").exists()
    assert tree_digest(existing_run) == before


@pytest.mark.slow
def test_missing_prompt_column_stops_before_proxies(tiny_testbed, tmp_path):
    """Prompts from a dataset are read and checked before any proxy is trained: a prompt column
    that does not exist is one line naming it and the columns there are."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"The film number {i} was"}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    result = run_cli(TINY_PPO, f"output_dir={out}", f"testbed.cache_dir={tiny_testbed.root.parent}",
                     f"data.prompts={prompts}", "data.prompt_column=nope", "data.eval_size=8", "eval.n_prompts=8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no column 'nope' (data.prompt_column); columns: text" in errors[0], result.stderr
    # checked by the entry point before any work: no run directory, no proxy loaded or trained
    assert not out.exists() and "proxies" not in result.stderr


@pytest.mark.slow
def test_proxy_dataset_in_neither_format(tiny_testbed, tmp_path):
    """proxy.dataset with neither TRL preference format stops train_rm before any training, with
    one line naming the columns it has and the formats accepted."""
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"text": "The film was great.", "label": 1}\n')
    out = tmp_path / "run"
    result = run_cli(ROOT / "configs" / "tiny" / "train_rm.yaml", f"output_dir={out}",
                     f"testbed.cache_dir={tiny_testbed.root.parent}", f"proxy.dataset={data}")
    # proxy.dataset is read for the proxy cache key of the run's identity, before the run directory exists
    assert_clean_failure(result, out, "proxy.dataset: ", before_run_dir=True)
    error = next(line for line in result.stderr.splitlines() if "error:" in line)
    assert "(has text, label)" in error and "implicit prompt" in error
    assert "independent proxies" not in result.stderr  # the "training K independent proxies" line


def test_unreadable_hub_model_and_short_gold_context_stop_before_work(tmp_path, foreign_world):
    """A hub name that cannot be reached, and a gold whose context is shorter than a response,
    are one line each, exit 2, before a run directory exists."""
    import foreign_world as fw

    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(TINY_PPO),
                             f"output_dir={out}", "policy.path=some-org/no-such-model", "gold.path=testbed",
                             "data.prompts=testbed", "proxy.dataset=testbed"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("input error: policy.path: could not read some-org/no-such-model")
    short = fw.llama_model(tmp_path / "short_gold", kind="classifier", max_positions=8)
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                             str(ROOT / "configs" / "foreign" / "ppo.yaml"), f"output_dir={out}",
                             f"policy.path={foreign_world['policy']}", f"gold.path={short}",
                             f"data.prompts={foreign_world['prompts']}",
                             f"proxy.backbone={foreign_world['proxy_backbone']}",
                             f"proxy.dataset={foreign_world['prompts']}"],  # never read: the check comes first
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "reads at most 8 tokens, fewer than a full response" in result.stderr
    assert not out.exists()
