"""Config loading: round trip, overrides, and one clear error (exit 2) for every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_overopt.config.experiment import Config, dump_yaml, field_docs
from rlhf_overopt.config.load import load_config
from rlhf_overopt.errors import ConfigError
from rlhf_overopt.run.directory import check_run_dir

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_derived_names(tmp_path):
    cfg = load_config(write(tmp_path, "method: bon\n", "my_exp.yaml"))
    assert cfg.method == "bon"
    assert cfg.name == "my_exp"
    assert cfg.output_dir == str(Path("runs") / "my_exp")
    assert cfg.proxy.k == 5 and cfg.aggregate.name == "mean"


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "method: ppo\nppo:\n  kl_coef: 0.1\n"), [
        "ppo.kl_coef=0.05", "ppo.steps=7", "ppo.adaptive_kl=true", "name=2024", "bon.n_grid=[1,2,4]",
        "deepspeed.zero_stage=3",
    ])
    assert cfg.ppo.kl_coef == 0.05 and cfg.ppo.steps == 7 and cfg.ppo.adaptive_kl is True
    assert cfg.name == "2024"  # string fields keep the raw text
    assert cfg.bon.n_grid == [1, 2, 4]
    assert cfg.deepspeed.zero_stage == 3


def test_int_is_accepted_for_float_fields(tmp_path):
    cfg = load_config(write(tmp_path, "ppo:\n  kl_coef: 1\n"))
    assert isinstance(cfg.ppo.kl_coef, float) and cfg.ppo.kl_coef == 1.0


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-5 as a string; float fields take it as the number meant
    cfg = load_config(write(tmp_path, "ppo:\n  lr: 1e-5\n"), ["ppo.value_lr=3e-4"])
    assert cfg.ppo.lr == 1e-5 and cfg.ppo.value_lr == 3e-4


def test_round_trip_through_resolved_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "method: bon\nproxy:\n  k: 3\n"), ["aggregate.name=uwo"])
    resolved = write(tmp_path, dump_yaml(cfg, {"git_sha": "abc"}), "resolved.yaml")
    again = load_config(resolved)
    assert again == cfg


@pytest.mark.parametrize(
    "yaml_text, overrides, key",
    [
        ("methd: ppo\n", [], "methd"),  # unknown top-level key
        ("ppo:\n  kl_cof: 0.1\n", [], "ppo.kl_cof"),  # unknown nested key
        ("", ["ppo.nope=1"], "ppo.nope"),
        ("ppo:\n  steps: ten\n", [], "ppo.steps"),  # wrong type
        ("ppo:\n  steps: 2.5\n", [], "ppo.steps"),
        ("ppo:\n  adaptive_kl: 1\n", [], "ppo.adaptive_kl"),  # int is not a bool
        ("method: sft\n", [], "method"),  # not a choice
        ("ppo: 3\n", [], "ppo"),  # a section must be a mapping
        ("proxy:\n  k: 0\n", [], "proxy.k"),  # impossible values
        ("ppo:\n  steps: -1\n", [], "ppo.steps"),
        ("ppo:\n  lr: 0\n", [], "ppo.lr"),
        ("eval:\n  top_p: 1.5\n", [], "eval.top_p"),
        ("testbed:\n  label_noise: 1.2\n", [], "testbed.label_noise"),
        ("ppo:\n  kl_coef: .nan\n", [], "ppo.kl_coef"),
        ("ppo:\n  batch_size: 10\n  mini_batch_size: 4\n", [], "ppo.mini_batch_size"),  # combination
        ("aggregate:\n  name: max\n", [], "aggregate.name"),
        ("proxy:\n  k: 3\naggregate:\n  name: member_3\n", [], "aggregate.name"),
        ("bon:\n  pool_size: 8\n  n_grid: [1, 16]\n", [], "bon.n_grid[1]"),  # n > N
        ("testbed:\n  n_embd: 30\n  n_head: 4\n", [], "testbed.n_embd"),
        ("policy:\n  path: /nonexistent/model\n", [], "policy.path"),  # missing files
        ("gold:\n  path: ./missing_gold\n", [], "gold.path"),
        ("deepspeed:\n  config: nothere.json\n", [], "deepspeed.config"),
        ("", ["ppo.kl_coef"], "ppo.kl_coef"),  # override without '='
        ("", ["ppo.steps=[unclosed"], "ppo.steps"),
    ],
)
def test_bad_input_names_the_key(tmp_path, yaml_text, overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, yaml_text), overrides)
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="--config: file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "ppo: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping of keys"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_every_field_has_a_docstring():
    rows = field_docs()
    assert len(rows) > 80
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert undocumented == []


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(write(tmp_path, "method: bon\n"), [f"output_dir={out}"])
    assert check_run_dir(cfg) == "new"
    out.mkdir()
    (out / "config.yaml").write_text(dump_yaml(cfg))
    with pytest.raises(ConfigError, match="output_dir: .* already holds a run"):
        check_run_dir(cfg)
    resumed = load_config(write(tmp_path, "method: bon\n"), [f"output_dir={out}", "resume=true"])
    assert check_run_dir(resumed) == "resume"
    changed = load_config(write(tmp_path, "method: bon\n"), [f"output_dir={out}", "resume=true", "proxy.k=3"])
    with pytest.raises(ConfigError, match=r"^proxy\.k: differs from the run being resumed"):
        check_run_dir(changed)
    (out / "summary.json").write_text('{"status": "completed"}')
    assert check_run_dir(resumed) == "completed"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_exit_2_before_any_work(tmp_path):
    cfg = write(tmp_path, "method: bon\nproxy:\n  kk: 3\n")
    result = run_cli("--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["config error: proxy.kk: unknown key (known: " +
                                                  result.stderr.split("(known: ")[1].strip()]
    assert not (tmp_path / "runs").exists()  # nothing created
    result = run_cli("--config", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert result.returncode == 2 and "file not found" in result.stderr
    result = run_cli("--config", str(write(tmp_path, "method: ppo\n", "p.yaml")), "ppo.kl_coef=abc", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("config error: ppo.kl_coef: expected a number")


def test_cli_list_keys(tmp_path):
    result = run_cli("--list-keys", cwd=tmp_path)
    assert result.returncode == 0
    assert "ppo.kl_coef (float, default 0.01):" in result.stdout


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "sweeps" in path.parts:
            continue
        cfg = load_config(path, check_paths=False)
        assert isinstance(cfg, Config), path
        # tiny twins exist for every main config
        if path.parent.name == "configs":
            assert (ROOT / "configs" / "tiny" / path.name).exists(), f"no tiny twin for {path.name}"
    assert yaml.safe_load((ROOT / "configs" / "ppo_ensemble.yaml").read_text())["method"] == "ppo"


def test_batch_must_split_over_ranks(tmp_path):
    from rlhf_overopt.config.validate import check_world_size

    cfg = load_config(write(tmp_path, "method: ppo\nppo:\n  batch_size: 6\n  mini_batch_size: 3\neval:\n  n_prompts: 12\n"))
    check_world_size(cfg, 1)
    check_world_size(cfg, 3)
    with pytest.raises(ConfigError, match=r"^ppo.batch_size: 6 cannot be split evenly over 4 ranks"):
        check_world_size(cfg, 4)
    with pytest.raises(ConfigError, match=r"^ppo.mini_batch_size"):
        check_world_size(cfg, 2)


def test_completed_run_extended_with_more_steps_resumes(tmp_path):
    out = tmp_path / "run"
    base = load_config(write(tmp_path, "method: ppo\n"), [f"output_dir={out}"])
    out.mkdir()
    (out / "config.yaml").write_text(dump_yaml(base))
    (out / "summary.json").write_text('{"status": "completed"}')
    same = load_config(write(tmp_path, "method: ppo\n"), [f"output_dir={out}", "resume=true"])
    longer = load_config(write(tmp_path, "method: ppo\n"), [f"output_dir={out}", "resume=true", "ppo.steps=400"])
    assert check_run_dir(same) == "completed"
    assert check_run_dir(longer) == "resume"


def test_run_written_before_a_key_existed_resumes_at_its_default(tmp_path):
    """A key added to the framework after a run was written: its default keeps the run's
    behaviour, so the run resumes; any other value would change what is computed."""
    out = tmp_path / "run"
    cfg = load_config(write(tmp_path, "method: ppo\n"), [f"output_dir={out}"])
    stored = yaml.safe_load(dump_yaml(cfg))
    del stored["proxy"]["train_pairs"]  # as written by a version without proxy.train_pairs
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(stored))
    resumed = load_config(write(tmp_path, "method: ppo\n"), [f"output_dir={out}", "resume=true"])
    assert check_run_dir(resumed) == "resume"
    changed = load_config(write(tmp_path, "method: ppo\n"),
                          [f"output_dir={out}", "resume=true", "proxy.train_pairs=100"])
    with pytest.raises(ConfigError, match=r"^proxy\.train_pairs: differs from the run being resumed"):
        check_run_dir(changed)


def test_more_steps_on_resume_refused_under_a_decaying_learning_rate(tmp_path):
    """The cosine schedule spans ppo.steps: extending a run whose learning rate decays would make
    it jump back up, which neither a longer nor the original run does."""
    out = tmp_path / "run"
    base = load_config(write(tmp_path, "method: ppo\n"), [f"output_dir={out}", "ppo.lr_final_ratio=0.1"])
    out.mkdir()
    (out / "config.yaml").write_text(dump_yaml(base))
    longer = load_config(write(tmp_path, "method: ppo\n"),
                         [f"output_dir={out}", "resume=true", "ppo.lr_final_ratio=0.1", "ppo.steps=400"])
    with pytest.raises(ConfigError, match=r"^ppo\.steps: cannot change on resume .* ppo\.lr_final_ratio=0\.1"):
        check_run_dir(longer)
    same = load_config(write(tmp_path, "method: ppo\n"), [f"output_dir={out}", "resume=true", "ppo.lr_final_ratio=0.1"])
    assert check_run_dir(same) == "resume"


# ---------------------------------------------------------------------------------------------
# The method table, the grpo section, empty files
# ---------------------------------------------------------------------------------------------


def test_method_table_drives_the_method_choices(tmp_path):
    from rlhf_overopt.config.methods import COMPOSITE_METHODS, METHODS

    needs = {"constrained": ["constrained.thresholds=[0.5, 0.5]"], "grpo": ["ppo.kl_coef=0"]}
    for name in METHODS:
        overrides = [o for section in METHODS[name].sections for o in needs.get(section, [])]
        assert load_config(None, [f"method={name}", *overrides], check_paths=False).method == name
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "method: sft\n"))
    message = str(info.value)
    assert message.startswith("method: must be one of") and "\n" not in message
    assert all(repr(name) in message for name in METHODS)
    assert COMPOSITE_METHODS == ("constrained_ppo", "nm_ppo", "dynamic_ppo", "proxy_points")
    assert COMPOSITE_METHODS == tuple(n for n, m in METHODS.items() if m.composite)
    assert METHODS["madpo"].driver == "dpo" and METHODS["nm_ppo"].driver == "constrained_ppo"
    assert METHODS["grpo"].driver == METHODS["rloo"].driver == "grpo"
    for m in METHODS.values():  # every table key names a real config key
        for key in (*m.split_keys, *m.response_caps):
            section, leaf = key.split(".")
            assert hasattr(getattr(Config(), section), leaf), (m.name, key)
        assert all(hasattr(Config(), s) for s in m.sections), m.name


def test_analysis_reads_the_composite_methods_from_the_table():
    import analysis.composite
    from rlhf_overopt.config.methods import COMPOSITE_METHODS

    assert analysis.composite.COMPOSITE_METHODS is COMPOSITE_METHODS


GRPO = ["method=grpo", "ppo.kl_coef=0"]


def test_grpo_defaults_and_keys():
    cfg = load_config(None, GRPO, check_paths=False)
    assert (cfg.grpo.group_size, cfg.grpo.std_normalize, cfg.grpo.loss_normalization) == (4, True, "auto")
    assert (cfg.grpo.kl_coef, cfg.grpo.kl_in, cfg.grpo.eps) == (0.0, "loss", 1e-4)
    keys = [row[0] for row in field_docs() if row[0].startswith("grpo.")]
    assert keys == ["grpo.group_size", "grpo.std_normalize", "grpo.loss_normalization", "grpo.kl_coef",
                    "grpo.kl_in", "grpo.eps"]
    assert all(row[3] for row in field_docs() if row[0].startswith("grpo."))
    # rloo ignores std_normalize; setting it is no error
    assert load_config(None, ["method=rloo", "ppo.kl_coef=0", "grpo.std_normalize=false"],
                       check_paths=False).grpo.std_normalize is False


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["grpo.group_size=1"], r"^grpo\.group_size: must be >= 2"),
        (["ppo.batch_size=10", "ppo.mini_batch_size=5", "grpo.group_size=4"], r"^grpo\.group_size: must divide ppo\.batch_size \(10"),
        (["ppo.kl_coef=0.1"], r"^ppo\.kl_coef: .*grpo\.kl_coef"),
        (["ppo.adaptive_kl=true"], r"^ppo\.adaptive_kl: "),
        (["ppo.whiten_rewards=true"], r"^ppo\.whiten_rewards: "),
        (["ppo.value_init=proxy"], r"^ppo\.value_init: "),
        (["grpo.kl_coef=-0.1"], r"^grpo\.kl_coef: must be >= 0"),
        (["grpo.eps=0"], r"^grpo\.eps: must be positive"),
    ],
)
def test_grpo_rejections(overrides, pattern):
    for method in ("grpo", "rloo"):
        with pytest.raises(ConfigError, match=pattern):
            load_config(None, [f"method={method}", "ppo.kl_coef=0", *overrides], check_paths=False)


def test_ppo_is_not_bound_by_grpo_rules():
    cfg = load_config(None, ["method=ppo", "ppo.batch_size=10", "ppo.mini_batch_size=5", "ppo.adaptive_kl=true"],
                      check_paths=False)
    assert cfg.ppo.kl_coef == 0.01
    with pytest.raises(ConfigError, match=r"^grpo\.group_size: must be >= 2"):  # its own field: always
        load_config(None, ["method=ppo", "grpo.group_size=1"], check_paths=False)


def test_grpo_groups_must_not_straddle_ranks():
    from rlhf_overopt.config.validate import check_world_size

    cfg = load_config(None, [*GRPO, "ppo.batch_size=8", "ppo.mini_batch_size=4", "grpo.group_size=4",
                             "eval.n_prompts=8"], check_paths=False)
    check_world_size(cfg, 2)  # 4 responses a rank: one whole group each
    with pytest.raises(ConfigError, match=r"^grpo\.group_size: each of 4 ranks holds 2 .*whole groups of 4"):
        check_world_size(cfg, 4)
    with pytest.raises(ConfigError, match=r"^ppo\.batch_size: 8 cannot be split evenly over 3 ranks"):
        check_world_size(cfg, 3)


@pytest.mark.parametrize("text", ["", "\n\n", "# method: ppo\n# (truncated)\n", "_meta:\n  git_sha: abc\n"])
def test_empty_config_file_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"^--config: .*exp\.yaml is empty; "):
        load_config(path)
    with pytest.raises(ConfigError, match=r"is empty"):  # overrides do not fill in for the file
        load_config(path, ["method=bon"])


def test_config_without_method_keeps_the_default(tmp_path):
    assert load_config(write(tmp_path, "ppo:\n  steps: 3\n")).method == Config().method == "ppo"
    assert load_config(None, check_paths=False).method == "ppo"  # no file at all: defaults


def test_cli_rejects_an_empty_config(tmp_path):
    result = run_cli("--config", str(write(tmp_path, "# nothing yet\n")), cwd=tmp_path)
    assert result.returncode == 2
    assert "is empty" in result.stderr and result.stderr.count("\n") == 1


# Method properties are columns of the method table (issue #24): outside config/, code reads a column
# (METHODS[cfg.method].value_model, .groups, "nm" in .sections, ...) instead of comparing method names.

def _method_name_comparisons(text: str) -> list[str]:
    """The lines of `text` that compare something called *method* with a quoted method name."""
    import re

    from rlhf_overopt.config.methods import METHODS

    names = "|".join(METHODS)
    literal = rf"""["']({names})["']"""
    patterns = [rf"method\w*\s*(==|!=)\s*{literal}", rf"{literal}\s*(==|!=)\s*\w*\.?method\b",
                rf"method\w*\s+(not\s+)?in\s+[(\[{{][^)\]}}]*{literal}"]
    return [line.strip() for line in text.splitlines() if any(re.search(p, line) for p in patterns)]


def test_method_name_comparison_finder_catches_each_form():
    planted = """
if cfg.method == "ppo":
x = method != 'bon'
if cfg.method in ("grpo", "rloo"):
ok = cfg.method not in {"dpo"}
if "madpo" == run.method:
if score_method not in ("loop", "vmap"):
if form == "bon":
if c.method == method:
"""
    assert len(_method_name_comparisons(planted)) == 5


def test_no_method_name_comparisons_outside_config():
    root = Path(__file__).resolve().parents[1]
    found = []
    for folder in ("rlhf_overopt", "launch", "analysis", "bench"):
        for f in sorted((root / folder).rglob("*.py")):
            if f.is_relative_to(root / "rlhf_overopt" / "config"):
                continue
            found += [f"{f.relative_to(root)}: {line}" for line in _method_name_comparisons(f.read_text())]
    assert not found, "compare a column of config.methods.METHODS instead:\n" + "\n".join(found)


def test_method_columns():
    from rlhf_overopt.config.methods import GRPO_METHODS, METHODS, SHAPING_METHODS, fit_form

    assert [n for n, m in METHODS.items() if m.value_model] == [
        "ppo", "constrained_ppo", "nm_ppo", "dynamic_ppo", "proxy_points"]
    assert GRPO_METHODS == ("grpo", "rloo") == tuple(n for n, m in METHODS.items() if "grpo" in m.sections)
    assert SHAPING_METHODS == ("ppo", "grpo", "rloo")
    assert [n for n, m in METHODS.items() if m.margins] == ["madpo"]
    assert [n for n, m in METHODS.items() if m.builds_testbed] == ["build_testbed"]
    # the policy is trained against a reference by every rollout method and the DPO family
    assert {n for n, m in METHODS.items() if m.trains_policy} == (
        {n for n, m in METHODS.items() if m.rollouts} | {"dpo", "madpo"})
    assert (fit_form("bon"), fit_form("scaling_law"), fit_form("ppo"), fit_form("proxy_points"),
            fit_form("not_a_method")) == ("bon", "bon", "rl", "rl", "rl")


# grpo.loss_normalization=auto (issue #24, item 6): RLOO is REINFORCE with a leave-one-out baseline, each
# response's summed log-prob gradient with no division by its length (Ahmadian et al. 2024).

@pytest.mark.parametrize("method, value, resolved", [
    ("rloo", None, "constant"), ("grpo", None, "sequence"), ("rloo", "token", "token"),
    ("rloo", "sequence", "sequence"), ("grpo", "constant", "constant"), ("ppo", None, "sequence")])
def test_loss_normalization_resolved_once_in_the_plan(method, value, resolved):
    from rlhf_overopt.config.plan import make_plan

    overrides = [f"method={method}"] + (["ppo.kl_coef=0"] if method != "ppo" else [])
    overrides += [f"grpo.loss_normalization={value}"] if value else []
    cfg = load_config(None, overrides, check_paths=False)
    assert cfg.grpo.loss_normalization == (value or "auto")  # the config keeps what the user wrote
    assert make_plan(cfg, 1).loss_normalization == resolved


def _notes(caplog, overrides):
    import logging

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_overopt"):
        load_config(None, overrides, check_paths=False)
    return [r.getMessage() for r in caplog.records if r.name == "rlhf_overopt"]


def test_rloo_with_sequence_normalization_says_it_adds_a_length_bias(caplog):
    rloo = ["method=rloo", "ppo.kl_coef=0"]
    (line,) = _notes(caplog, [*rloo, "grpo.loss_normalization=sequence"])
    assert line.startswith("grpo.loss_normalization=sequence: set, but") and "length bias" in line
    assert _notes(caplog, rloo) == []  # the default says nothing
    assert _notes(caplog, [*rloo, "grpo.loss_normalization=constant"]) == []
    assert _notes(caplog, [*GRPO, "grpo.loss_normalization=sequence"]) == []  # GRPO's own objective


@pytest.mark.parametrize("overrides, key, why", [
    (["method=bon", "ppo.steps=5", "ppo.lr=0.001"], "ppo.lr, ppo.steps", "method bon does not read the ppo section"),
    (["method=dpo", "madpo.margin_aggregator=wco"], "madpo.margin_aggregator", "does not read the madpo section"),
    (["method=ppo", "grpo.group_size=8"], "grpo.group_size", "method ppo does not read the grpo section"),
    (["method=rloo", "ppo.kl_coef=0", "grpo.std_normalize=false"], "grpo.std_normalize", "divides by no group std"),
    (["method=rloo", "ppo.kl_coef=0", "grpo.eps=0.01"], "grpo.eps", "divides by no group std"),
    ([*GRPO, "grpo.std_normalize=false", "grpo.eps=0.01"], "grpo.eps", "std_normalize=false divides by no group"),
    (["method=bon", "aggregate.name=wco"], "aggregate.name", "bon.aggregators name"),
    (["method=ppo", "aggregate.par_references=8"], "aggregate.par_references", "only with aggregate.shaping=par"),
    (["method=ppo", "data.prompts=p.jsonl", "data.eval_split=test", "data.prompt_template={instruction}",
      "data.prompt_column=nope"],
     "data.prompt_column", "data.prompt_template builds each prompt"),
])
def test_explicit_keys_made_unused_are_reported_in_one_line(caplog, overrides, key, why):
    (line,) = _notes(caplog, overrides)
    assert line.startswith(f"{key}: set, but ") and why in line


@pytest.mark.parametrize("overrides", [
    ["method=ppo", "ppo.steps=5", "aggregate.name=wco"],
    ["method=ppo", "aggregate.shaping=par", "aggregate.par_references=8"],
    ["method=ppo", "data.prompts=p.jsonl", "data.eval_split=test", "data.prompt_template={instruction}"],
    ["method=ppo", "data.prompts=p.jsonl", "data.eval_split=test", "data.prompt_column=text"],
    [*GRPO, "grpo.eps=0.01"],
    ["method=bon", "aggregate.uwo_lambda=0.1"],  # bon reads the aggregators' parameters
])
def test_keys_in_use_are_not_reported(caplog, overrides):
    assert _notes(caplog, overrides) == []


def test_a_user_world_does_not_open_the_testbed():
    """configs/foreign/ name their own policy, gold, prompts and pairs: no stage may build the
    testbed (dpo.dataset's default once made every one of them build the full-size testbed)."""
    from rlhf_overopt.run.lifecycle import uses_testbed

    root = Path(__file__).resolve().parents[1] / "configs"
    foreign = sorted((root / "foreign").glob("*.yaml"))
    assert foreign
    for path in foreign:
        assert not uses_testbed(load_config(path, check_paths=False)), path.name
    for path in sorted((root / "tiny").glob("*.yaml")):
        assert uses_testbed(load_config(path, check_paths=False)), path.name
