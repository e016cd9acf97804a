"""Sweeps: grid expansion, run names, up-front validation, the W&B spec, and a sweep that is
killed partway and run again (every run completes; none runs twice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch.sweep_plan import (
    Resources,
    SweepError,
    build_command,
    cluster_command,
    expand_grid,
    load_sweep,
    override_item,
    plan_runs,
    run_names,
    wandb_sweep_spec,
)
from rlhf_overopt.config.experiment import Config
from rlhf_overopt.config.load import parse_override
from rlhf_overopt.run.directory import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SWEEP_CLI = ROOT / "launch" / "sweep.py"
TINY_SWEEP = ROOT / "configs" / "sweeps" / "tiny_kl_sweep.yaml"


def write_sweep(tmp_path: Path, body: dict[str, Any], name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# Hang guards, not deadlines: a sweep on a loaded machine may take long, so a wait fails only when
# nothing under the sweep folder has changed for STALL_S seconds (or, as a last resort, after
# HANG_GUARD_S in all; QUICK_GUARD_S for a command that starts no run), and then says what it was
# waiting for.
STALL_S = 900.0
HANG_GUARD_S = 3 * 3600.0
QUICK_GUARD_S = 900.0


def _progress_signature(folder: Path | None) -> tuple:
    """Size and mtime of every file under `folder` (sweep.json, logs, curves, checkpoints)."""
    if folder is None or not folder.exists():
        return ()
    signature = []
    for path in folder.rglob("*"):
        try:
            st = path.stat()
        except OSError:  # written or replaced while we looked
            continue
        signature.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(signature))


def wait_until(done, what: str, *, proc: subprocess.Popen | None = None, folder: Path | None = None,
               poll: float = 0.05) -> None:
    """Poll `done()` until it is true, or until `proc` (if given) has exited.

    Fails with a message naming `what` only when the sweep stalls: no file under `folder` changed
    for STALL_S seconds, or HANG_GUARD_S passed (QUICK_GUARD_S with no folder to watch).
    """
    guard = HANG_GUARD_S if folder is not None else QUICK_GUARD_S
    started = last_change = time.monotonic()
    signature = _progress_signature(folder)
    next_look = started + 5.0
    while not done():
        if proc is not None and proc.poll() is not None:
            return
        now = time.monotonic()
        if now >= next_look:  # walking the folder costs more than polling `done`
            next_look = now + 5.0
            current = _progress_signature(folder)
            if current != signature:
                signature, last_change = current, now
        stalled = folder is not None and now - last_change > STALL_S
        if stalled or now - started > guard:
            reason = f"nothing under {folder} changed for {STALL_S:.0f} s" if stalled else f"{guard:.0f} s passed"
            pytest.fail(f"hang guard: still waiting for {what}: {reason}")
        time.sleep(poll)


def run_watched(command: list[str], what: str, *, folder: Path | None = None,
                cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run `command` to its end (output captured), failing only if it stalls (see `wait_until`)."""
    with open(os.devnull, "rb") as stdin, tempfile.TemporaryFile("w+") as out, \
            tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=cwd, stdin=stdin, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            wait_until(lambda: proc.poll() is not None, what, folder=folder)
        finally:
            if proc.poll() is None:  # the hang guard fired: do not leave the sweep and its runs behind
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read())


def sweep_cli(*args: str, cwd: Path = ROOT, folder: Path | None = None) -> subprocess.CompletedProcess[str]:
    """launch/sweep.py with `args`; `folder`: the sweep folder whose files show its progress."""
    return run_watched([sys.executable, str(SWEEP_CLI), *args], f"launch/sweep.py {' '.join(args)} to exit",
                       folder=folder, cwd=cwd)


# ---------------------------------------------------------------- expansion and names


def test_expand_grid_is_the_cartesian_product_last_key_fastest() -> None:
    points = expand_grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert points == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
                      {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]


def test_run_names_are_short_readable_and_unique() -> None:
    grid = {"aggregate.name": ["member_0", "uwo"], "ppo.kl_coef": [0.01, 1e-5], "seed": [0, 1], "ppo.lr": [1e-4]}
    varied = [k for k, v in grid.items() if len(v) > 1]
    names = run_names(expand_grid(grid), varied)
    assert names[:3] == ["member_0-kl_coef0.01-seed0", "member_0-kl_coef0.01-seed1", "member_0-kl_coef1e-05-seed0"]
    assert names[-1] == "uwo-kl_coef1e-05-seed1"
    assert len(set(names)) == 8
    # values that slug to the same text fall back to longer, still unique names
    clash = run_names([{"policy.path": "a b"}, {"policy.path": "a_b"}], ["policy.path"])
    assert len(set(clash)) == 2
    assert run_names([{"x": 1}], []) == ["run"]


@pytest.mark.parametrize("value", [0.01, 1e-5, 3, True, "uwo", [1, 2], None])
def test_override_items_read_back_as_the_same_value(value: Any) -> None:
    _, parsed = parse_override(override_item("ppo.kl_coef" if not isinstance(value, str) else "aggregate.name",
                                               value))
    assert parsed == value or float(parsed) == value  # YAML 1.1 reads 1e-05 as text; the config reads it as 1e-5


def test_plan_sets_run_dirs_group_and_validated_configs(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {
        "base": str(ROOT / "configs" / "tiny" / "ppo_ensemble.yaml"),
        "name": "demo",
        "grid": {"aggregate.name": ["mean", "wco"], "ppo.kl_coef": [0.01, 0.1], "seed": [0, 1]},
        "set": {"ppo.steps": 2},
    })
    sweep = load_sweep(path, ["eval.every=1"])
    runs = plan_runs(sweep, tmp_path / "runs", threads_per_run=1)
    assert len(runs) == 8 and all(r.action == "new" for r in runs)
    first = runs[0]
    assert first.name == "mean-kl_coef0.01-seed0"
    assert first.output_dir == tmp_path / "runs" / "demo" / first.name
    cfg = first.config
    assert (cfg.aggregate.name, cfg.ppo.kl_coef, cfg.seed, cfg.ppo.steps, cfg.eval.every) == ("mean", 0.01, 0, 2, 1)
    assert cfg.wandb.group == "demo" and cfg.name == first.name and cfg.num_threads == 1
    assert len({r.config.wandb.project for r in runs}) == 1
    assert [r.config.seed for r in runs[:2]] == [0, 1]
    only = plan_runs(sweep, tmp_path / "runs", select=["aggregate.name=wco", "ppo.kl_coef=0.1"])
    assert [r.name for r in only] == ["wco-kl_coef0.1-seed0", "wco-kl_coef0.1-seed1"]
    assert only[0].config.num_threads == Config().num_threads  # one at a time: the config's default


@pytest.mark.parametrize("body, message", [
    ({"grid": {"ppo.kl_coef": [0.1]}}, "base:"),
    ({"base": "configs/tiny/ppo_ensemble.yaml", "grid": {}}, "grid:"),
    ({"base": "configs/tiny/ppo_ensemble.yaml", "grid": {"ppo.kl_coef": 0.1}}, "grid.ppo.kl_coef:"),
    ({"base": "configs/tiny/ppo_ensemble.yaml", "grid": {"output_dir": ["a", "b"]}}, "output_dir:"),
    ({"base": "configs/tiny/ppo_ensemble.yaml", "grid": {"wandb.project": ["a", "b"]}}, "grid.wandb.project:"),
    ({"base": "configs/tiny/ppo_ensemble.yaml", "grid": {"seed": [1]}, "sets": {}}, "sets: unknown sweep file key"),
    ({"base": "configs/nope.yaml", "grid": {"seed": [1]}}, "base: config file not found"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path: Path, body: dict[str, Any], message: str) -> None:
    with pytest.raises(SweepError, match=message):
        load_sweep(write_sweep(tmp_path, body))


def test_bad_value_exits_2_naming_run_and_key_before_any_run(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {
        "base": "configs/tiny/ppo_ensemble.yaml",
        "name": "bad",
        "grid": {"ppo.kl_coef": [0.01, 0.1], "aggregate.name": ["mean", "bogus"]},
    })
    runs_root = tmp_path / "runs"
    result = sweep_cli("--config", str(path), "--runs-root", str(runs_root))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("config error: run kl_coef0.01-bogus: aggregate.name: unknown aggregator 'bogus'")
    assert not runs_root.exists()  # nothing started, nothing written
    result = sweep_cli("--config", str(path), "--runs-root", str(runs_root), "ppo.klcoef=1")
    assert result.returncode == 2 and "ppo.klcoef: unknown key" in result.stderr
    assert not runs_root.exists()


def test_shipped_sweeps_expand_and_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # configs/sweeps/constrained_seeds.yaml reads the run its experiment makes first
    # (launch/train.py --config configs/proxy_points.yaml -> runs/proxy_points), which a clean clone lacks
    (tmp_path / "runs" / "proxy_points").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        runs = plan_runs(load_sweep(path), tmp_path / "runs")
        assert runs and len({r.name for r in runs}) == len(runs), path
    kl = load_sweep(ROOT / "configs" / "sweeps" / "kl_sweep.yaml")
    assert set(kl.grid["aggregate.name"]) == {"member_0", "mean", "wco", "uwo"}
    assert len(kl.grid["ppo.kl_coef"]) >= 4
    assert {r.config.method for r in plan_runs(kl, tmp_path / "runs")} == {"ppo"}
    tiny = load_sweep(TINY_SWEEP)
    assert len(plan_runs(tiny, tmp_path / "runs")) == 4


def test_wandb_sweep_spec_runs_the_same_grid_points(tmp_path: Path) -> None:
    sweep = load_sweep(TINY_SWEEP, ["ppo.steps=2"])
    spec = wandb_sweep_spec(sweep, project="proj", runs_root=str(tmp_path / "runs"))
    assert spec["method"] == "grid" and spec["project"] == "proj" and spec["program"] == "launch/sweep.py"
    assert spec["parameters"] == {k: {"values": v} for k, v in sweep.grid.items()}
    assert spec["command"][-2:] == ["--select", "${args_no_hyphens}"]

    out = tmp_path / "wandb_sweep.yaml"
    result = sweep_cli("--config", str(TINY_SWEEP), "--wandb-sweep", str(out), "ppo.steps=2")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(out.read_text())["parameters"] == spec["parameters"]
    # What a W&B agent would run for one grid point: the same run directory as the local sweep.
    agent_args = ["aggregate.name=uwo", "ppo.kl_coef=0.1"]
    command = [c for c in spec["command"] if not c.startswith("${")]
    command = command[:command.index("--select")]
    result = sweep_cli(*command[:2], "--dry-run", *command[2:], "--select", *agent_args)
    assert result.returncode == 0, result.stderr
    listed = [line.split() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert [(row[0], row[1]) for row in listed] == [("uwo-kl_coef0.1", "new")]
    assert "wandb.mode=online" in result.stdout and "wandb.group=tiny_kl_sweep" in result.stdout


def test_commands_resume_and_launchers_get_their_own_port(tmp_path: Path) -> None:
    sweep = load_sweep(TINY_SWEEP)
    run = plan_runs(sweep, tmp_path / "runs")[0]
    plain = build_command(run, sweep.base, "new", python="python")
    assert plain[:4] == ["python", str(ROOT / "launch" / "train.py"), "--config", str(sweep.base)]
    assert "resume=true" not in plain and f"output_dir={run.output_dir}" in plain
    assert build_command(run, sweep.base, "resume", python="python")[-1] == "resume=true"
    ds = build_command(run, sweep.base, "new", launcher="deepspeed --num_gpus 2", port=29611)
    assert ds[:4] == ["deepspeed", "--master_port=29611", "--num_gpus", "2"]
    assert ds[4] == str(ROOT / "launch" / "train.py")
    custom = build_command(run, sweep.base, "new", launcher="torchrun --master-port {port} --nproc_per_node 2",
                           port=29612)
    assert custom[:3] == ["torchrun", "--master-port", "29612"]


# ---------------------------------------------------------------- kill and resume
#
# The tests that start runs are sized by run launches (each is a Python process importing torch and
# DeepSpeed): the process runner's kill-and-rerun needs three runs (one completed before the kill,
# one killed mid-run, one new run beside the resumed one), the local executor's two, and the
# executor is compared with the process runner on the run both completed before their kill.

KILL_SWEEP = "kill"


def _state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "sweep.json").read_text())
    except (OSError, ValueError):
        return {}


def _summary_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _curves_without_times(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.startswith("time_")} for row in read_jsonl(run_dir / "curves.jsonl")]


def _attempts(state: dict[str, Any], name: str) -> list[tuple[int, str, str | None]]:
    return [(a["invocation"], a["action"], a["outcome"]) for a in state["runs"][name]["attempts"]]


def _kill_sweep_file(folder: Path, aggregators: list[str]) -> Path:
    """A sweep of tiny PPO runs, one per aggregator, all named `KILL_SWEEP` (so the process runner's
    and the executor's runs of one aggregator get the same command but for the runs root)."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_sweep(folder, {"base": str(ROOT / "configs" / "tiny" / "ppo_ensemble.yaml"), "name": KILL_SWEEP,
                                "grid": {"aggregate.name": aggregators}})


def _run_then_kill(args: list[str], folder: Path, names: list[str]) -> dict[str, bytes]:
    """Run the sweep one run at a time and SIGKILL its whole process group (the sweep, any submitit
    job controllers, the runs) once `names[0]` has completed and `names[1]` has logged an
    evaluation; return the files of `names[0]`'s run directory."""
    proc = subprocess.Popen([sys.executable, str(SWEEP_CLI), *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = folder / names[0], folder / names[1]

    def first_done_second_evaluated() -> bool:
        runs = _state(folder).get("runs", {})
        return runs.get(names[0], {}).get("status") == "completed" and (second / "curves.jsonl").exists()

    try:
        wait_until(first_done_second_evaluated, f"{names[0]} to complete and {names[1]} to log an evaluation",
                   proc=proc, folder=folder)
        assert proc.poll() is None, "the sweep ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _summary_status(first) == "completed"
    assert _summary_status(second) == "running"  # killed mid-run: nothing recorded its end
    return {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def killed_process_sweep(tmp_path_factory, tiny_testbed) -> dict[str, Any]:
    """The process runner's sweep of three runs, killed after its first run completed and its
    second logged an evaluation (see `_run_then_kill`); the rerun is the test's."""
    root = tmp_path_factory.mktemp("process_sweep")
    path = _kill_sweep_file(root, ["member_0", "uwo", "mean"])
    runs_root = root / "runs"
    folder = runs_root / KILL_SWEEP
    args = ["--config", str(path), "--runs-root", str(runs_root), "--no-report",
            f"testbed.cache_dir={tiny_testbed.root.parent}"]
    names = ["member_0", "uwo", "mean"]
    first_files = _run_then_kill(args, folder, names)
    return {"path": path, "runs_root": runs_root, "folder": folder, "args": args, "names": names,
            "first_files": first_files}


@pytest.mark.slow
def test_sweep_killed_partway_then_rerun_completes_every_run_once(killed_process_sweep: dict[str, Any]) -> None:
    """After the kill, run the sweep again two runs at a time, then a third time.

    "None run twice" means: (1) no run whose summary said completed is started again — its
    files are untouched by the later invocations, and in sweep.json no attempt of any run starts
    after one of its attempts completed; (2) no curves.jsonl holds a step twice.
    """
    folder, args, names = (killed_process_sweep[k] for k in ("folder", "args", "names"))
    first = folder / names[0]
    result = sweep_cli(*args[:-1], "--parallel", "2", args[-1], folder=folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # every run completed, with each evaluation step logged once
    for name in names:
        assert _summary_status(folder / name) == "completed", name
        steps = [row["step"] for row in read_jsonl(folder / name / "curves.jsonl")]
        assert steps == [0, 2, 4], (name, steps)
    # the run completed before the kill was not touched again
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == killed_process_sweep["first_files"]

    state = _state(folder)
    _, second_inv = state["invocations"]
    assert second_inv["skipped_completed"] == [names[0]]
    assert set(second_inv["result"].values()) == {"completed"}
    for name in names:
        outcomes = [a["outcome"] for a in state["runs"][name]["attempts"]]
        assert outcomes.count("completed") == 1 and outcomes[-1] == "completed", (name, outcomes)
    assert _attempts(state, names[0]) == [(0, "new", "completed")]
    assert _attempts(state, names[1]) == [(0, "new", "interrupted"), (1, "resume", "completed")]
    assert _attempts(state, names[2]) == [(1, "new", "completed")]
    # the resumed run and the new one shared the machine, two at a time, one thread each
    (_, resumed), (new,) = state["runs"][names[1]]["attempts"], state["runs"][names[2]]["attempts"]
    assert "num_threads=1" in new["command"] and resumed["command"][-1] == "resume=true"
    assert new["started_at_unix"] < resumed["started_at_unix"] + resumed["elapsed_s"]
    assert resumed["started_at_unix"] < new["started_at_unix"] + new["elapsed_s"]

    # a third invocation has nothing to do, then writes the report of the whole grid
    again = sweep_cli(*[a for a in args if a != "--no-report"], folder=folder)
    assert again.returncode == 0, again.stderr
    assert "0 to run, 3 already completed" in again.stdout
    table = (folder / "report" / "table.md").read_text()
    assert sum(1 for line in table.splitlines() if line.startswith("| ") and "ppo" in line) == 3
    assert (folder / "report" / "frontier_ppo.png").stat().st_size > 1000
    frontier = (folder / "report" / "frontier.md").read_text()
    assert all(f"| ppo | {name} | 1 |" in frontier for name in names), frontier
    # changing a value under completed runs is refused up front (the command line's exit 2 for a
    # planning error: test_bad_value_exits_2_naming_run_and_key_before_any_run)
    changed = load_sweep(killed_process_sweep["path"], [args[-1], "ppo.lr=0.5"])
    with pytest.raises(SweepError, match="differs from the run being resumed"):
        plan_runs(changed, killed_process_sweep["runs_root"])


# ---------------------------------------------------------------- submitit executors


@pytest.mark.slow
def test_local_executor_killed_then_resubmitted_matches_the_process_runner(
        tmp_path: Path, tiny_testbed, killed_process_sweep: dict[str, Any]) -> None:
    """The same kill under ``--executor local`` (SIGKILL reaches submitit's job controllers and
    the runs too); submit again, two jobs at a time. The run completed before the kill has the
    command and the curves the process runner gave the same grid point."""
    runs_root = tmp_path / "runs"
    folder = runs_root / KILL_SWEEP
    path = _kill_sweep_file(tmp_path, ["member_0", "uwo"])
    args = ["--config", str(path), "--runs-root", str(runs_root), "--no-report", "--executor", "local",
            "--", f"testbed.cache_dir={tiny_testbed.root.parent}"]
    names = ["member_0", "uwo"]
    first = folder / names[0]
    first_files = _run_then_kill(args, folder, names)

    result = sweep_cli(*args[:-2], "--parallel", "2", *args[-2:], folder=folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in names:
        assert _summary_status(folder / name) == "completed", name
        assert [row["step"] for row in read_jsonl(folder / name / "curves.jsonl")] == [0, 2, 4], name
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == first_files
    assert (folder / "submitit").is_dir()

    state = _state(folder)
    first_inv, again = state["invocations"]
    assert first_inv["submission"]["executor"] == "local" and set(first_inv["submission"]["job_ids"]) == set(names)
    assert again["skipped_completed"] == [names[0]] and set(again["submission"]["job_ids"]) == {names[1]}
    assert _attempts(state, names[0]) == [(0, "new", "completed")]
    assert _attempts(state, names[1]) == [(0, "new", "interrupted"), (1, "resume", "completed")]
    for name in names:
        for attempt in state["runs"][name]["attempts"]:
            invocation = state["invocations"][attempt["invocation"]]
            assert attempt["job_id"] == invocation["submission"]["job_ids"][name]
    # the resumed job ran what the process runner would have run, two at a time
    sweep = load_sweep(path, args[-1:])
    resumed = plan_runs(sweep, runs_root, threads_per_run=1)[1]
    assert state["runs"][names[1]]["attempts"][1]["command"] == build_command(resumed, sweep.base, "resume")

    # the same run directory as the process runner's, from the same command
    processes = killed_process_sweep["folder"]
    assert _curves_without_times(first) == _curves_without_times(processes / names[0])
    (submitted,) = state["runs"][names[0]]["attempts"]
    (started, *_) = _state(processes)["runs"][names[0]]["attempts"]
    process_root = str(killed_process_sweep["runs_root"])
    assert submitted["command"] == [c.replace(process_root, str(runs_root)) for c in started["command"]]


def test_slurm_commands_for_one_and_several_nodes(tmp_path: Path) -> None:
    sweep = load_sweep(TINY_SWEEP)
    run = plan_runs(sweep, tmp_path / "runs")[0]
    train = [str(ROOT / "launch" / "train.py"), "--config", str(sweep.base), *run.overrides]
    one = cluster_command(run, sweep.base, "new", Resources(gpus_per_node=2), port=29611)
    assert one == ["deepspeed", "--num_gpus", "2", "--master_port", "29611", *train]
    two = cluster_command(run, sweep.base, "resume", Resources(gpus_per_node=8, nodes=2), port=31000,
                          node_rank=1, master_addr="gpu-a01", hostfile="/s/submitit/hostfiles/77")
    assert two == ["deepspeed", "--hostfile", "/s/submitit/hostfiles/77", "--no_ssh", "--node_rank", "1",
                   "--master_addr", "gpu-a01", "--master_port", "31000", *train, "resume=true"]
    assert cluster_command(run, sweep.base, "new", Resources(), port=1, python="python") == ["python", *train]


def test_bad_resources_key_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {"base": "configs/tiny/ppo_ensemble.yaml", "grid": {"seed": [1, 2]},
                                  "resources": {"gpus_per_node": 2, "gpu_per_node": 2}})
    result = sweep_cli("--config", str(path), "--runs-root", str(tmp_path / "runs"), "--executor", "slurm")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        ("config error: resources.gpu_per_node: unknown resources key (known: gpus_per_node, nodes, cpus_per_task, "
         "mem_gb, timeout_min, partition, account, constraint)")]
    good = write_sweep(tmp_path, {"base": "configs/tiny/ppo_ensemble.yaml", "grid": {"seed": [1, 2]},
                                  "resources": {"gpus_per_node": 8, "nodes": 2, "partition": "gpu"}}, "good.yaml")
    assert load_sweep(good).resources.nodes == 2
