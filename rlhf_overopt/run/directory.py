"""The run directory: the single source of truth that analysis, sweeps and W&B read.

Every file is written atomically (write to a temporary sibling, fsync, ``os.replace``), so a run
killed at any instant leaves each file either in its previous complete state or its new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from rlhf_overopt.config.experiment import Config, dump_yaml, to_dict
from rlhf_overopt.errors import ConfigError

CURVE_REQUIRED_KEYS = (
    "method",
    "step",
    "kl",
    "sqrt_kl",
    "proxy_score",
    "proxy_member_scores",
    "gold_score",
)
"""Keys every curves.jsonl row carries; never renamed once landed. Declared here only: the writer's
check (`check_curve_row`), the row builder (`curve_row`) and analysis/ read this tuple."""


def curve_row(*, method: str, step: int, kl: float, proxy_score: float, proxy_member_scores: list[float],
              gold_score: float, **keys: Any) -> dict[str, Any]:
    """One curves.jsonl row: the required keys in CURVE_REQUIRED_KEYS order, then the method's `keys`.

    The one place a row is made (evaluations, best-of-n pools, scaling-law cells), so every row
    derives `sqrt_kl` = sqrt(max(kl, 0)) the same way. `kl` in nats; `proxy_score` the aggregated
    objective; `proxy_member_scores` the K member means; `gold_score` the mean gold.
    """
    clash = [k for k in keys if k in CURVE_REQUIRED_KEYS]
    if clash:
        raise TypeError(f"curve_row: {', '.join(clash)} are required keys; pass them by name (sqrt_kl is derived)")
    return {"method": method, "step": step, "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)), "proxy_score": proxy_score,
            "proxy_member_scores": proxy_member_scores, "gold_score": gold_score, **keys}

LIBRARIES = ("torch", "transformers", "trl", "deepspeed", "datasets", "wandb", "peft", "numpy", "tokenizers")


# ---------------------------------------------------------------------------------------------
# Atomic file primitives
# ---------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic UTF-8 text write."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (strict: NaN and inf are refused, not written as invalid JSON)."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock across processes (ranks, parallel sweep runs) on `path`, held for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a JSON-lines file ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically replace a JSON-lines file with `rows`."""
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    atomic_write_text(path, text)


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows by rewriting the whole file atomically (run files are small; a torn line is worse)."""
    write_jsonl(path, read_jsonl(path) + list(rows))


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------


def git_sha(cwd: str | os.PathLike | None = None) -> str:
    """The current commit of the source tree ('unknown' outside git), with '+dirty' if modified."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def sha256_bytes(data: bytes) -> str:
    """'sha256:<hex digest>' of `data`: the form every hash in `_meta.identity` takes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """'sha256:<hex digest>' of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """'sha256:<hex digest>' of `obj` as canonical JSON (sorted keys, no whitespace, UTF-8): a list
    of strings hashes its items and their order, and no two lists share an encoding."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """What makes a run self-describing: git SHA, library versions, host, command line."""
    return {
        "git_sha": git_sha(),
        "versions": library_versions(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "command": " ".join(argv if argv is not None else sys.argv),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Keys a resumed run may change: they steer how far or how verbosely to go, not what is computed.
RESUMABLE_CHANGES = {"resume", "ppo.steps", "wandb.mode", "num_threads"}


def check_run_dir(cfg: Config) -> str:
    """Decide, before any work, what to do with cfg.output_dir: 'new', 'resume' or 'completed'.

    An existing run is never overwritten: without resume=true it is an error; with resume=true the
    stored config must match (apart from RESUMABLE_CHANGES). A key the stored config lacks was
    added to the framework after the run started; it matches when it has its default value, since
    a new key's default keeps the behaviour the run had.
    """
    root = Path(cfg.output_dir)
    config_path = root / "config.yaml"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir: {root} exists and is not a directory")
    if not config_path.exists():
        if root.exists() and any(p.name != ".lock" for p in root.iterdir()) and not cfg.resume:
            raise ConfigError(f"output_dir: {root} is not empty and holds no run; choose another output_dir")
        return "new"
    if not cfg.resume:
        raise ConfigError(
            f"output_dir: {root} already holds a run; pass resume=true to continue it or choose another output_dir"
        )
    try:
        stored = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise ConfigError(f"output_dir: {config_path} is unreadable; cannot resume") from None
    stored.pop("_meta", None)
    now, before = _flatten(to_dict(cfg)), _flatten(stored)
    defaults = _flatten(to_dict(Config()))
    for key in sorted(set(now) | set(before)):
        if key in RESUMABLE_CHANGES:
            continue
        if key not in before and key in defaults and now[key] == defaults[key]:
            continue  # a key added to the framework after the run was written, left at its default
        if now.get(key) != before.get(key):
            raise ConfigError(
                f"{key}: differs from the run being resumed ({before.get(key)!r} there, {now.get(key)!r} now)"
            )
    if now.get("ppo.steps") != before.get("ppo.steps") and now.get("ppo.lr_final_ratio", 1.0) != 1.0:
        raise ConfigError(
            f"ppo.steps: cannot change on resume ({before.get('ppo.steps')!r} there, {now.get('ppo.steps')!r} now) "
            f"while ppo.lr_final_ratio={now.get('ppo.lr_final_ratio')} decays the learning rate over ppo.steps; "
            "the schedule would jump (start a new run instead)"
        )
    summary = root / "summary.json"
    if summary.exists():
        try:
            completed = json.loads(summary.read_text()).get("status") == "completed"
        except json.JSONDecodeError:
            completed = False
        # a finished run asked for more PPO steps continues from its last checkpoint
        if completed and now.get("ppo.steps") == before.get("ppo.steps"):
            return "completed"
    return "resume"


@dataclasses.dataclass
class RunDir:
    """Files of one run. Only the main process (rank 0) writes; other ranks get a read-only view."""

    root: Path
    writable: bool = True

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def curves_path(self) -> Path:
        return self.root / "curves.jsonl"

    @property
    def samples_path(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def init(self, cfg: Config, argv: list[str] | None = None, mark_running: bool = True,
             identity: dict[str, str] | None = None) -> None:
        """Create the directory and write the resolved config with provenance and the run's
        `identity` (run/identity.py) under `_meta` (first start only: a resumed run keeps the
        config.yaml it started with); `mark_running` sets summary.json's status (a resumed run does
        it once its checkpoint loaded)."""
        if not self.writable:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            meta = provenance(argv)
            if identity is not None:
                meta["identity"] = identity
            atomic_write_text(self.config_path, dump_yaml(cfg, meta))
        if mark_running:
            self.write_summary({"status": "running"})

    def recorded_identity(self) -> dict[str, Any] | None:
        """The identity config.yaml records under `_meta.identity`; None without one (no config.yaml
        yet, or a run written before identities were recorded)."""
        if not self.config_path.exists():
            return None
        try:
            stored = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise ConfigError(f"output_dir: {self.config_path} is unreadable; cannot resume") from None
        identity = (stored.get("_meta") or {}).get("identity") if isinstance(stored, dict) else None
        return dict(identity) if identity else None

    def log_curve(self, rows: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Append evaluation points to curves.jsonl after checking the required keys and finiteness."""
        rows = [rows] if isinstance(rows, dict) else list(rows)
        for row in rows:
            check_curve_row(row)
        if self.writable:
            append_jsonl(self.curves_path, rows)

    def curves(self) -> list[dict[str, Any]]:
        return read_jsonl(self.curves_path)

    def truncate_curves(self, max_step: int) -> None:
        """Drop rows past `max_step` (rows logged after the checkpoint a run resumes from)."""
        if self.writable and self.curves_path.exists():
            write_jsonl(self.curves_path, [r for r in self.curves() if r["step"] <= max_step])

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        if self.writable and rows:
            append_jsonl(self.samples_path, rows)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writable:
            atomic_write_json(self.summary_path, summary)

    def write_json(self, name: str, obj: Any) -> None:
        if self.writable:
            atomic_write_json(self.root / name, obj)


def check_curve_row(row: dict[str, Any]) -> None:
    """A curves row must hold the required keys with finite numbers (a NaN curve is a wrong curve)."""
    missing = [k for k in CURVE_REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"curves row is missing {', '.join(missing)}")
    for key in ("kl", "sqrt_kl", "proxy_score", "gold_score"):
        if not isinstance(row[key], (int, float)) or not math.isfinite(row[key]):
            raise ValueError(f"curves row at step {row['step']}: {key} is not a finite number ({row[key]!r})")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in row["proxy_member_scores"]):
        raise ValueError(f"curves row at step {row['step']}: proxy_member_scores has a non-finite value")


def curve_label(row: dict[str, Any]) -> str:
    """Name of the curve a row belongs to: method plus aggregator where there is one."""
    return f"{row['method']}/{row['aggregator']}" if row.get("aggregator") else str(row["method"])


def summarize_curves(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per curve: final and peak gold, proxy at the gold peak, KL at the gold peak."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(curve_label(row), []).append(row)
    out = {}
    for label, curve in by_label.items():
        curve = sorted(curve, key=lambda r: (r["kl"], r["step"]) if r["method"] == "bon" else (r["step"],))
        peak = max(curve, key=lambda r: r["gold_score"])
        final = curve[-1]
        out[label] = {
            "points": len(curve),
            "final_gold": final["gold_score"],
            "final_proxy": final["proxy_score"],
            "final_kl": final["kl"],
            "peak_gold": peak["gold_score"],
            "proxy_at_gold_peak": peak["proxy_score"],
            "kl_at_gold_peak": peak["kl"],
            "sqrt_kl_at_gold_peak": peak["sqrt_kl"],
            "step_at_gold_peak": peak["step"],
        }
    return out
