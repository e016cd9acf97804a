"""What a run's seed fixed, recorded under config.yaml's `_meta.identity` (rlhf_overopt/run/identity.py):
arms that share a seed record the same identity, what the seed fixes changes it, it lands in
config.yaml at first start, and a resumed run whose identity changed stops with one line.

No training: identities are known before anything trains (the proxy key is the cache folder's name),
and the one lifecycle test runs a driver that does nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_overopt.config.load import load_config
from rlhf_overopt.config.methods import METHODS
from rlhf_overopt.data.prompts import check_prompts
from rlhf_overopt.errors import InputError
from rlhf_overopt.run.directory import RunDir, check_run_dir
from rlhf_overopt.run.dist import DistInfo
from rlhf_overopt.run.identity import (
    IDENTITY_KEYS,
    check_identity,
    local_policy_identity,
    policy_identity,
    run_identity,
)
from rlhf_overopt.run.lifecycle import execute, init_run_dir

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
RANK0 = DistInfo(0, 1, 0, torch.device("cpu"))


def _cfg(tb_config, out: Path, name: str = "bon_ensemble.yaml", *overrides: str):
    return load_config(TINY / name, [f"testbed.cache_dir={tb_config.cache_dir}", f"output_dir={out}", *overrides])


def _prompts_file(path: Path, n: int = 40, changed: int | None = None) -> Path:
    rows = [{"prompt": f"review {i}: the film was" + (" edited" if i == changed else "")} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_arms_of_one_seed_share_the_identity(tiny_testbed_config, tiny_testbed, tmp_path):
    uwo = run_identity(_cfg(tiny_testbed_config, tmp_path / "a", "bon_ensemble.yaml", "aggregate.name=uwo"),
                       tiny_testbed)
    mean = run_identity(_cfg(tiny_testbed_config, tmp_path / "b", "bon_ensemble.yaml", "aggregate.name=mean"),
                        tiny_testbed)
    assert uwo == mean
    assert set(uwo) == {"proxy_cache_key", "initial_policy", "eval_prompts"}
    assert uwo["proxy_cache_key"].startswith("proxies-")
    assert uwo["initial_policy"] == f"testbed:{tiny_testbed.root.name}/policy"
    assert uwo["eval_prompts"].startswith("sha256:")
    # another method on the same seed's proxies and prompts (MADPO vs DPO) pairs too
    dpo = run_identity(_cfg(tiny_testbed_config, tmp_path / "c", "dpo.yaml"), tiny_testbed)
    madpo = run_identity(_cfg(tiny_testbed_config, tmp_path / "d", "madpo.yaml"), tiny_testbed)
    assert dpo == madpo


def test_the_seed_and_the_eval_prompts_change_it(tiny_testbed_config, tiny_testbed, tmp_path):
    base = run_identity(_cfg(tiny_testbed_config, tmp_path / "a"), tiny_testbed)
    other_seed = run_identity(_cfg(tiny_testbed_config, tmp_path / "b", "bon_ensemble.yaml", "seed=1"), tiny_testbed)
    assert other_seed["proxy_cache_key"] != base["proxy_cache_key"]
    assert other_seed["initial_policy"] == base["initial_policy"]
    assert other_seed["eval_prompts"] == base["eval_prompts"]  # the testbed's eval split does not move
    fewer = run_identity(_cfg(tiny_testbed_config, tmp_path / "c", "bon_ensemble.yaml", "eval.n_prompts=4"),
                         tiny_testbed)
    assert fewer["eval_prompts"] != base["eval_prompts"]
    assert fewer["proxy_cache_key"] == base["proxy_cache_key"]
    # a prompt file: editing one held-out prompt changes the identity, editing a train prompt does not
    data = ["data.prompts=" + str(_prompts_file(tmp_path / "p.jsonl")), "data.eval_size=8"]
    cfg = _cfg(tiny_testbed_config, tmp_path / "d", "bon_ensemble.yaml", *data)
    before = run_identity(cfg, tiny_testbed)["eval_prompts"]
    train, evaluation = check_prompts(cfg, tiny_testbed, required=True)
    held = int(evaluation[0].split()[1].rstrip(":"))
    kept = int(train[0].split()[1].rstrip(":"))
    _prompts_file(tmp_path / "p.jsonl", changed=kept)
    assert run_identity(cfg, tiny_testbed)["eval_prompts"] == before
    _prompts_file(tmp_path / "p.jsonl", changed=held)
    assert run_identity(cfg, tiny_testbed)["eval_prompts"] != before


def test_keys_follow_the_method_table(tiny_testbed_config, tiny_testbed, tmp_path):
    for name in ("train_rm", "label_preferences", "constrained_ppo", "build_testbed"):
        cfg = _cfg(tiny_testbed_config, tmp_path / name, f"{name}.yaml")
        identity = run_identity(cfg, tiny_testbed)
        assert set(identity) <= set(IDENTITY_KEYS)
        method = METHODS[cfg.method]
        assert ("eval_prompts" in identity) == method.evaluates
        assert ("components_cache_key" in identity) == method.composite
        assert ("proxy_cache_key" in identity) == ("proxy" in method.sections and not method.composite)
        assert ("initial_policy" in identity) == ("policy" in method.sections)
        assert all(v for v in identity.values())
    # proxies from proxy.path: the hash of the saved ensemble's ensemble.json
    saved = tmp_path / "ensemble"
    saved.mkdir()
    (saved / "ensemble.json").write_text('{"k": 3, "score_mean": [0.1, 0.2, 0.3]}\n')
    cfg = _cfg(tiny_testbed_config, tmp_path / "e")
    cfg = dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, path=str(saved)))
    first = run_identity(cfg, tiny_testbed)["proxy_cache_key"]
    assert first.startswith("sha256:")
    (saved / "ensemble.json").write_text('{"k": 3, "score_mean": [0.1, 0.2, 0.4]}\n')
    assert run_identity(cfg, tiny_testbed)["proxy_cache_key"] != first
    (saved / "ensemble.json").unlink()  # not an ensemble: no identity; loading it stops the run, naming it
    assert run_identity(cfg, tiny_testbed)["proxy_cache_key"] is None


def test_a_local_policy_is_its_config_and_weight_file_sizes(tiny_testbed_config, tmp_path):
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "config.json").write_text('{"n_layer": 2}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "README.md").write_text("notes")
    first = local_policy_identity(folder)
    assert first.startswith("local:sha256:")
    cfg = _cfg(tiny_testbed_config, tmp_path / "run")
    assert policy_identity(dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, path=str(folder))),
                           None) == first
    (folder / "README.md").write_text("other notes")  # not a weight file
    assert local_policy_identity(folder) == first
    (folder / "model.safetensors").write_bytes(b"\1" * 64)  # same size: weights are not read (documented)
    assert local_policy_identity(folder) == first
    (folder / "model.safetensors").write_bytes(b"\0" * 65)
    assert local_policy_identity(folder) != first
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "config.json").write_text('{"n_layer": 3}')
    assert local_policy_identity(folder) != first
    hub = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, path="EleutherAI/pythia-70m"))
    assert policy_identity(hub, None) == "hub:EleutherAI/pythia-70m"


def test_identity_lands_in_config_yaml_and_a_changed_one_stops_the_resume(tiny_testbed_config, tiny_testbed,
                                                                          tmp_path):
    prompts = _prompts_file(tmp_path / "p.jsonl")
    cfg = _cfg(tiny_testbed_config, tmp_path / "run", "bon_ensemble.yaml", f"data.prompts={prompts}",
               "data.eval_size=8")
    run = RunDir(cfg.run_dir)
    identity = init_run_dir(cfg, run, tiny_testbed, RANK0, "new", ["train.py"])
    stored = yaml.safe_load(run.config_path.read_text())
    assert stored["_meta"]["identity"] == identity == run_identity(cfg, tiny_testbed)
    assert stored["_meta"]["git_sha"]  # provenance stays beside it
    # the resume comparison ignores _meta; an unchanged identity resumes
    resumed = dataclasses.replace(cfg, resume=True)
    assert check_run_dir(resumed) == "resume"
    written = run.config_path.read_bytes()
    init_run_dir(resumed, run, tiny_testbed, RANK0, "resume")
    assert run.config_path.read_bytes() == written  # config.yaml is written at first start only
    # every prompt edited: the eval prompts changed under the run
    prompts.write_text(prompts.read_text().replace("the film was", "the film is"))
    with pytest.raises(InputError) as err:
        init_run_dir(resumed, run, tiny_testbed, RANK0, "resume")
    message = str(err.value)
    assert "\n" not in message and message.startswith("_meta.identity.eval_prompts: the eval prompts changed")
    assert run.config_path.read_bytes() == written
    # a run recorded before identities were is not checked
    check_identity(None, identity)


def test_execute_records_the_identity_and_refuses_a_changed_resume(tiny_testbed_config, tmp_path, caplog):
    """Through the lifecycle, with a driver that does nothing: config.yaml gets `_meta.identity`; a
    resume after the prompt file changed exits 2 with one error line and leaves every file as it was."""
    prompts = _prompts_file(tmp_path / "p.jsonl")
    cfg = _cfg(tiny_testbed_config, tmp_path / "run", "bon_ensemble.yaml", f"data.prompts={prompts}",
               "data.eval_size=8", f"num_threads={torch.get_num_threads()}")
    threads = torch.get_num_threads()
    try:
        assert execute(cfg, "new", lambda method: (lambda ctx: {"ran": True})) == 0
        root = Path(cfg.run_dir)
        identity = yaml.safe_load((root / "config.yaml").read_text())["_meta"]["identity"]
        assert set(identity) == {"proxy_cache_key", "initial_policy", "eval_prompts"}
        assert json.loads((root / "summary.json").read_text())["status"] == "completed"
        before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
        prompts.write_text(prompts.read_text().replace("the film was", "the film is"))
        resumed = dataclasses.replace(cfg, resume=True)
        with caplog.at_level("ERROR", logger="rlhf_overopt"):
            assert execute(resumed, "resume", lambda method: pytest.fail("the driver must not start")) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "_meta.identity.eval_prompts" in errors[0]
        assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    finally:
        torch.set_num_threads(threads)
