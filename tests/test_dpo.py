"""DPO / IPO / SLiC and MADPO: data preparation, quality tiers, margin weights, TRL parity, CLI runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_overopt.config.load import load_config
from rlhf_overopt.config.plan import preference_schedule as schedule
from rlhf_overopt.data.preferences import (
    PreferenceDataError,
    collate_pairs,
    corpus_tier,
    fit_response_budget,
    load_preference_dataset,
    tokenize_pairs,
)
from rlhf_overopt.ops.aggregate import aggregate
from rlhf_overopt.ops.losses import madpo_weights, preference_loss
from rlhf_overopt.rewards.margins import margin_weights
from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS, read_jsonl
from rlhf_overopt.run.seeds import batch_indices

ROOT = Path(__file__).resolve().parents[1]

WORDS = ["the", "film", "was", "good", "bad", "great", "awful", "plot", "acting", "score", "not", "very", "but",
         "boring", "fun"]


def tiny_tokenizer(out_dir: Path):
    from rlhf_overopt.testbed.tokenizer import train_tokenizer

    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8)) for i in range(200)]
    return train_tokenizer(corpus, 300, out_dir)


# ---------------------------------------------------------------------------------------------
# Schedule and sharding
# ---------------------------------------------------------------------------------------------


def test_schedule_evaluates_at_start_fractions_and_end():
    assert schedule(100, 10, 1.0, 2) == (10, 10, [0, 5, 10])
    assert schedule(100, 10, 1.5, 2) == (10, 15, [0, 5, 10, 15])
    assert schedule(100, 10, 0.25, 8) == (10, 2, [0, 1, 2])  # several evals per step collapse
    assert schedule(105, 10, 1.0, 4)[0] == 10  # the last partial batch is dropped


def test_two_ranks_share_the_one_rank_batch():
    for step in (0, 3, 7, 8, 15):  # epochs 0 and 1
        whole = batch_indices(step, 8, 16, 130, seed=3, rank=0, world=1)
        halves = [batch_indices(step, 8, 16, 130, seed=3, rank=r, world=2) for r in (0, 1)]
        assert torch.equal(torch.cat(halves), whole)
    epoch0 = torch.cat([batch_indices(s, 8, 16, 130, seed=3, rank=0, world=1) for s in range(8)])
    assert len(set(epoch0.tolist())) == 128  # an epoch visits distinct pairs
    assert not torch.equal(batch_indices(0, 8, 16, 130, 3, 0, 1), batch_indices(8, 8, 16, 130, 3, 0, 1))


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching
# ---------------------------------------------------------------------------------------------


def test_tokenize_pairs_prefix_eos_and_truncation(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    eos = tok.eos_token_id
    pairs = tokenize_pairs(tok, ["the film was", "the plot"], [" good", " was very boring plot"],
                           [" bad", " fun"], [True, False], [True, True], max_length=64)
    # prompt tokens + response tokens == tokens of prompt + response, then EOS where the response ended
    assert pairs.prompt_ids[0] + pairs.chosen_ids[0] == tok("the film was good")["input_ids"] + [eos]
    assert pairs.prompt_ids[1] + pairs.chosen_ids[1] == tok("the plot was very boring plot")["input_ids"]
    assert pairs.rejected_ids[1][-1] == eos
    cut = tokenize_pairs(tok, ["the film was not very good but"], [" boring boring boring boring"], [" fun"],
                         [True], [True], max_length=6)
    assert len(cut.prompt_ids[0]) + len(cut.chosen_ids[0]) <= 6 and cut.n_truncated == 1
    assert cut.prompt_ids[0] == tok("the film was not very good but")["input_ids"][-len(cut.prompt_ids[0]):]
    with pytest.raises(PreferenceDataError, match="row 0: the chosen response has no tokens"):
        tokenize_pairs(tok, ["the film"], [""], [" bad"], [False], [True], max_length=16)


def test_collate_pairs_layout(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    pairs = tokenize_pairs(tok, ["the film was", "the plot"], [" good", " was very boring"], [" bad", " fun"],
                           [True, True], [True, True], max_length=64)
    b = collate_pairs(pairs, [1, 0], tok.pad_token_id)
    assert len(b) == 2 and b.query_ids.shape[0] == 4
    assert torch.equal(b.query_ids[0], b.query_ids[2])  # chosen rows first, then the same prompts
    for row, ids in enumerate([pairs.chosen_ids[1], pairs.chosen_ids[0], pairs.rejected_ids[1],
                               pairs.rejected_ids[0]]):
        assert b.response_ids[row, : len(ids)].tolist() == ids and int(b.response_mask[row].sum()) == len(ids)
    assert (b.query_mask[:, -1] == 1).all()  # queries left-padded, responses right-padded


# ---------------------------------------------------------------------------------------------
# User datasets
# ---------------------------------------------------------------------------------------------


def test_user_dataset_row_missing_a_field_is_named(tmp_path):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2 + [{"prompt": "a", "rejected": " c"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PreferenceDataError, match=r"row 2: field 'chosen' is missing"):
        load_preference_dataset(path)
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["a", "b"], "chosen": [" x", "  "], "rejected": [" y", " z"]}).save_to_disk(
        str(tmp_path / "ds"))
    with pytest.raises(PreferenceDataError, match=r"row 1: field 'chosen' is empty"):
        load_preference_dataset(tmp_path / "ds")
    Dataset.from_dict({"prompt": ["a"], "chosen": [" x"]}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(PreferenceDataError, match="missing column.*rejected"):
        load_preference_dataset(tmp_path / "nocol")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert len(load_preference_dataset(good)) == 2


# ---------------------------------------------------------------------------------------------
# Quality tiers
# ---------------------------------------------------------------------------------------------


def _toy_prefs(n: int) -> dict[str, list]:
    return {
        "prompt_id": list(range(n)),
        "prompt": [f"Review number {i % 5}" for i in range(n)],
        "chosen": [f" policy chosen {i}" for i in range(n)],
        "rejected": [f" policy rejected {i}" for i in range(n)],
        "chosen_ended": [True] * n,
        "rejected_ended": [False] * n,
        "chosen_gold": [1.0] * n,
        "rejected_gold": [-1.0] * n,
        "label_flipped": [False] * n,
        "chosen_ids": [[1]] * n,
        "rejected_ids": [[2]] * n,
    }


def _toy_gold(prompts, responses, ended):
    return torch.tensor([5.0 if "corpus" in r else -5.0 for r in responses])


def _tier(prefs, share, seed, noise=0.0):
    continuations = [f" corpus text {i}" for i in range(len(prefs["prompt"]))]
    return corpus_tier(prefs, continuations, share=share, seed=seed, fit_budget=lambda t: (t, True),
                       gold_fn=_toy_gold, label_noise=noise)


def test_corpus_tier_shares_labels_and_determinism():
    prefs = _toy_prefs(40)
    for share, expected in ((0.0, 0), (0.25, 10), (0.5, 20), (1.0, 40)):
        out, stats = _tier(prefs, share, seed=1)
        replaced = [i for i in range(40) if out["corpus_side"][i]]
        assert stats.n_replaced == len(replaced) == expected
        for i in range(40):
            if i not in replaced:  # untouched pairs keep text and label
                assert (out["chosen"][i], out["rejected"][i]) == (prefs["chosen"][i], prefs["rejected"][i])
            else:  # the prompt's own continuation; it scores gold 5 > any policy response: it wins
                assert out["chosen"][i] == f" corpus text {i}" and out["corpus_side"][i] == "chosen"
                assert out["chosen_gold"][i] == 5.0 and out["chosen_ended"][i] is True
                assert out["rejected"][i] in (prefs["chosen"][i], prefs["rejected"][i])
        assert "chosen_ids" not in out and prefs["chosen"][0] == " policy chosen 0"  # input untouched
    assert 0 < _tier(prefs, 1.0, seed=1)[1].n_replaced_chosen_side < 40  # a coin picks the replaced side
    # deterministic in the seed, different across seeds
    assert _tier(prefs, 0.25, seed=7)[0] == _tier(prefs, 0.25, seed=7)[0]
    assert _tier(prefs, 0.25, seed=7)[0]["corpus_side"] != _tier(prefs, 0.25, seed=8)[0]["corpus_side"]
    # the testbed's noise rule: exactly round(label_noise * n) relabelled pairs are flipped
    noisy, stats = _tier(prefs, 0.5, seed=1, noise=0.25)
    flipped = [i for i in range(40) if noisy["corpus_side"][i] and noisy["label_flipped"][i]]
    assert stats.n_flipped == len(flipped) == 5
    assert all(noisy["corpus_side"][i] == "rejected" and noisy["chosen_gold"][i] < noisy["rejected_gold"][i]
               for i in flipped)


def test_fit_response_budget_cuts_like_sampling(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    text = " the film was very good but the plot was boring"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert fit_response_budget(text, tok, n + 1) == (text, True)  # text + EOS fit
    cut, ended = fit_response_budget(text, tok, n)
    assert not ended and tok(cut, add_special_tokens=False)["input_ids"] == \
        tok(text, add_special_tokens=False)["input_ids"][:n]


# ---------------------------------------------------------------------------------------------
# MADPO margins -> weights
# ---------------------------------------------------------------------------------------------


class _FakeEnsemble:
    """Member i scores a text as (i + 1) * (its number of 'good') - i * (its number of 'bad')."""

    k = 3

    def __init__(self):
        self.calls = []

    def score_texts(self, prompts, responses, ended, standardized=None):
        self.calls.append(standardized)
        good = torch.tensor([float(r.count("good")) for r in responses])
        bad = torch.tensor([float(r.count("bad")) for r in responses])
        return torch.stack([(i + 1) * good - i * bad + 0.5 * i for i in range(self.k)])


@pytest.mark.parametrize("name", ["member_0", "member_2", "mean", "wco", "uwo"])
def test_madpo_weights_are_madpo_weights_of_aggregated_member_margins(name):
    chosen = [" good good", " bad", " good bad bad", " good", " bad bad bad", ""]
    rejected = [" bad", " good", " good", " good good good", " good", " bad"]
    columns = {"prompt": ["p"] * 6, "chosen": chosen, "rejected": rejected, "chosen_ended": [True] * 6,
               "rejected_ended": [True] * 6, "label_flipped": [False, True, False, True, False, False]}
    cfg = load_config(None, ["method=madpo", "proxy.k=3", f"madpo.margin_aggregator={name}",
                             "aggregate.uwo_lambda=0.3", "proxy.score_batch_size=4", "madpo.c_max=3.0"],
                      check_paths=False)
    ens = _FakeEnsemble()
    weights, stats = margin_weights(cfg, ens, columns, rank=0, world=1)
    members = ens.score_texts(["p"] * 6, chosen, [True] * 6) - ens.score_texts(["p"] * 6, rejected, [True] * 6)
    expected = madpo_weights(aggregate(members, name, uwo_lambda=0.3), c_max=3.0)
    torch.testing.assert_close(weights, expected)
    assert set(ens.calls[:-2]) == {False}  # raw Bradley-Terry margins by default
    assert stats["weights"]["min"] == pytest.approx(float(expected.min()))
    assert stats["weights"]["max"] == pytest.approx(float(expected.max()))
    assert stats["margin_aggregator"] == name and "weight_mean_flipped_labels" in stats


def test_member_margins_are_cached_per_ensemble_and_pairs(tmp_path):
    """A second MADPO run over the same ensemble files and pairs reads the member margins back
    (no scoring) and gets the same weights, whatever its aggregator; other pairs, a retrained
    ensemble or another scoring batch size are scored afresh."""
    chosen = [" good good", " bad", " good bad bad", " good"]
    rejected = [" bad", " good", " good", " good good good"]
    columns = {"prompt": ["p"] * 4, "chosen": chosen, "rejected": rejected, "chosen_ended": [True] * 4,
               "rejected_ended": [True] * 4}
    root = tmp_path / "ensemble"
    root.mkdir()
    (root / "ensemble.json").write_text("{}")

    def cfg(*extra):
        return load_config(None, ["method=madpo", "proxy.k=3", f"testbed.cache_dir={tmp_path / 'cache'}",
                                  "proxy.score_batch_size=2", *extra], check_paths=False)

    first_ens = _FakeEnsemble()
    first, stats = margin_weights(cfg(), first_ens, columns, rank=0, world=1, ensemble_root=root)
    assert first_ens.calls and not stats["member_margins_cached"]
    assert len(list((tmp_path / "cache" / "margins").glob("*.safetensors"))) == 1
    again_ens = _FakeEnsemble()
    again, stats = margin_weights(cfg(), again_ens, columns, rank=0, world=1, ensemble_root=root)
    assert again_ens.calls == [] and stats["member_margins_cached"]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    wco_ens = _FakeEnsemble()
    _wco, _ = margin_weights(cfg("madpo.margin_aggregator=wco"), wco_ens, columns, rank=0, world=1, ensemble_root=root)
    assert wco_ens.calls == []  # the aggregator is applied after the cache
    for change in ("pairs", "ensemble", "batch"):
        ens = _FakeEnsemble()
        cols = {**columns, "chosen": [" good"] * 4} if change == "pairs" else columns
        if change == "ensemble":
            (root / "member_0.safetensors").write_bytes(b"retrained")
        margin_weights(cfg(*(["proxy.score_batch_size=3"] if change == "batch" else [])), ens, cols, rank=0,
                       world=1, ensemble_root=root)
        assert ens.calls, change


# ---------------------------------------------------------------------------------------------
# Parity with TRL's DPOTrainer
# ---------------------------------------------------------------------------------------------


def test_loss_equals_trl_dpo_trainer(tmp_path):
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer

    from rlhf_overopt.rollout import sequence_logprobs

    tok = tiny_tokenizer(tmp_path / "model")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "model")
    rows = {"prompt": ["the film was", "the plot", "acting was not", "but the score"],
            "chosen": [" good fun", " was great and fun", " bad", " very good"],
            "rejected": [" awful", " boring", " very very boring plot", " bad bad"]}
    # bf16=False: TRL 1.16 otherwise runs its models under a bf16 autocast on CPU (log-probs off by ~1e-3)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], report_to="none",
                     use_cpu=True, bf16=False, max_length=None, per_device_train_batch_size=4)
    # TRL builds its reference from the path; the policy then moves away from it, on both sides
    trainer = DPOTrainer(model=str(tmp_path / "model"), args=args, train_dataset=Dataset.from_dict(rows),
                         processing_class=tok)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    policy = GPT2LMHeadModel.from_pretrained(tmp_path / "model")
    policy.load_state_dict(trainer.model.state_dict())
    reference = GPT2LMHeadModel.from_pretrained(tmp_path / "model")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    # ours: TRL-compatible tokenization (EOS on every response), left-padded queries
    pairs = tokenize_pairs(tok, rows["prompt"], rows["chosen"], rows["rejected"], [True] * 4, [True] * 4, 64)
    ours = collate_pairs(pairs, range(4), tok.pad_token_id)
    with torch.no_grad():
        logps, ref_logps = (sequence_logprobs(m.eval(), ours.query_ids, ours.query_mask, ours.response_ids,
                                              ours.response_mask).sum(-1) for m in (policy, reference))
    lengths = ours.response_mask.sum(-1).float()
    for trl_type, ours_type, normalize in (("sigmoid", "dpo", False), ("hinge", "slic", False),
                                           ("ipo", "ipo", True)):
        trainer.loss_types, trainer.loss_weights = [trl_type], [1.0]
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(trainer.model, batch))
        pol, ref = (logps / lengths, ref_logps / lengths) if normalize else (logps, ref_logps)
        loss = preference_loss(*pol.chunk(2), *ref.chunk(2), beta=0.1, loss_type=ours_type)[0]
        assert abs(float(loss) - trl_loss) < 1e-4, (trl_type, float(loss), trl_loss)
    assert abs(trl_loss) > 1e-3  # the policy really differs from the reference


# ---------------------------------------------------------------------------------------------
# End to end through the command line
# ---------------------------------------------------------------------------------------------


def _train(config: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / config),
                           f"output_dir={out}", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def _check_run(out: Path, method: str, beta: float) -> list[dict]:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    rows = read_jsonl(out / "curves.jsonl")
    data = summary["data"]  # the tiny testbed drops tied pairs: about 56 pairs, 7 steps of 8
    assert data["total_steps"] >= 6
    assert [r["step"] for r in rows] == schedule(data["n_pairs"], 8, 1.0, 2)[2]
    for row in rows:
        assert set(CURVE_REQUIRED_KEYS) <= set(row)
        assert row["method"] == method and row["beta"] == beta
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # step 0 is the reference itself
    assert rows[-1]["kl"] > 1e-3  # the policy moved
    return rows


def _policy_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_testbed):
    out = tmp_path_factory.mktemp("dpo") / "run"
    result = _train("configs/tiny/dpo.yaml", out, f"testbed.cache_dir={tiny_testbed.root.parent}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_cli_dpo_tiny(dpo_run, tiny_testbed):
    _check_run(dpo_run, "dpo", 0.1)
    start, trained = _policy_state(tiny_testbed.policy_dir), _policy_state(dpo_run / "policy")
    changed = [k for k in trained if k in start and not torch.equal(trained[k].float(), start[k].float())]
    assert len(changed) > len(trained) // 2
    stats = read_jsonl(dpo_run / "train_stats.jsonl")
    assert [s["step"] for s in stats] == list(range(1, len(stats) + 1)) and len(stats) >= 6


@pytest.mark.slow
def test_cli_madpo_tiny_low_quality(tmp_path, tiny_testbed):
    out = tmp_path / "run"
    # also the path without precomputed reference log-probs (a frozen reference on every batch)
    result = _train("configs/tiny/madpo.yaml", out, f"testbed.cache_dir={tiny_testbed.root.parent}",
                    "dpo.precompute_ref=false")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _check_run(out, "madpo", 0.1)
    assert rows[0]["margin_aggregator"] == "mean" and rows[0]["quality"] == "low"
    summary = json.loads((out / "summary.json").read_text())
    weights = summary["madpo"]["weights"]
    assert weights["min"] <= weights["mean"] <= weights["max"] and weights["min"] != weights["max"]
    assert summary["data"]["n_replaced"] == round(0.5 * summary["data"]["n_pairs"])


RESUME_SCRIPT = """
import sys
sys.argv = ["launch/train.py"]
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/launch")
import train
import rlhf_overopt.update as dpo

real = dpo.preference_loss
def interrupted(*args, **kwargs):
    interrupted.calls += 1
    if interrupted.calls == 6:   # step 5: after the step-4 checkpoint, before the step-6 one
        raise KeyboardInterrupt
    return real(*args, **kwargs)
interrupted.calls = 0
dpo.preference_loss = interrupted
try:
    train.main({args!r})
except KeyboardInterrupt:
    pass
dpo.preference_loss = real
sys.exit(train.main({args!r} + ["resume=true"]))
"""


@pytest.mark.slow
def test_resume_equals_uninterrupted(dpo_run, tmp_path, tiny_testbed):
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/tiny/dpo.yaml"), f"output_dir={out}",
            f"testbed.cache_dir={tiny_testbed.root.parent}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", RESUME_SCRIPT.format(root=str(ROOT), args=args)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed at step 4" in result.stderr
    resumed, whole = read_jsonl(out / "curves.jsonl"), read_jsonl(dpo_run / "curves.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    for a, b in zip(resumed, whole):
        for key in ("kl", "gold_score", "proxy_score", "proxy_member_scores"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    final_resumed, final_whole = _policy_state(out / "policy"), _policy_state(dpo_run / "policy")
    for key, value in final_whole.items():
        torch.testing.assert_close(final_resumed[key], value, atol=1e-6, rtol=0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_rank_zero3_equals_one_rank(dpo_run, tmp_path, tiny_testbed):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "launch" / "train.py"), "--config",
           str(ROOT / "configs/tiny/dpo.yaml"), f"output_dir={out}", "deepspeed.zero_stage=3",
           f"testbed.cache_dir={tiny_testbed.root.parent}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _check_run(out, "dpo", 0.1)
    assert rows[0]["n_eval"] == 16  # both ranks' halves of the eval prompts were gathered
    # each rank trained on its half of every batch: the update is the one-rank update
    two, one = _policy_state(out / "policy"), _policy_state(dpo_run / "policy")
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-5, f"largest parameter difference {worst}"
