"""Read back what a W&B run logged offline: its ``run-<id>.wandb`` file.

wandb (0.31) in offline mode writes one file per run, ``<dir>/wandb/offline-run-*/run-<id>.wandb``.
It is a record log in the LevelDB log format (the layout wandb's writer uses):

- a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (uint16, little endian), version 0 (uint8);
- then 32 KiB blocks; each chunk has a 7-byte header (CRC-32 of the type byte then the data, unmasked, as
  uint32, data length as uint16, chunk type as uint8) and its data. Type 1 is a whole record,
  2/3/4 the first/middle/last piece of a record split across blocks. A block tail shorter than
  a chunk header is zero padding;
- each record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

:func:`read_offline_run` turns the records into plain Python: the run's project, group, name,
config, the history rows (``run.log`` calls), metric definitions and the final summary, so that
a test can check what was logged without a W&B server. Nothing here writes. A test helper
(tests/test_wandb.py is its one user), not a user command: the run directory, not W&B, is the
source of truth that analysis reads.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32768
IDENT = b":W&B"
MAGIC = 0xBEE1
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbLogError(ValueError):
    """The file is not a wandb record log, or a chunk is corrupt."""


def iter_record_bytes(path: str | Path) -> Iterator[bytes]:
    """The serialized records of a ``.wandb`` file, in the order they were written.

    Raises:
        WandbLogError: bad file header, a checksum mismatch, or a record split inconsistently.
            A final record cut off mid-write (the process was killed) is dropped silently.
    """
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        raise WandbLogError(f"{path}: too short for a wandb log header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != IDENT or magic != MAGIC or version != 0:
        raise WandbLogError(f"{path}: not a wandb record log (header {ident!r} {magic:#x} v{version})")
    pos = FILE_HEADER.size
    pending: bytes | None = None
    while pos + CHUNK_HEADER.size <= len(data):
        room = BLOCK_SIZE - pos % BLOCK_SIZE
        if room < CHUNK_HEADER.size:  # zero padding at the end of a block
            pos += room
            continue
        checksum, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if checksum == 0 and length == 0 and kind == 0:  # padding written by a block flush
            pos += room
            continue
        start = pos + CHUNK_HEADER.size
        chunk = data[start:start + length]
        if len(chunk) < length:
            return  # truncated tail
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise WandbLogError(f"{path}: checksum mismatch in the chunk at byte {pos}")
        pos = start + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise WandbLogError(f"{path}: record continuation without a first piece at byte {pos}")
            pending += chunk
            if kind == LAST:
                yield pending
                pending = None
        else:
            raise WandbLogError(f"{path}: unknown chunk type {kind} at byte {pos}")


def iter_records(path: str | Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file as ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    for raw in iter_record_bytes(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def _items_to_dict(items: Any) -> dict[str, Any]:
    """History/summary/config items ({key | nested_key[], value_json}) as a nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    """What one offline W&B run logged."""

    path: Path
    """The ``run-<id>.wandb`` file."""
    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    """Config as logged (wandb's own ``_wandb`` entry removed)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict per ``run.log`` call (with wandb's ``_step``, ``_runtime``, ``_timestamp``)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """The run summary after the last update."""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``define_metric`` calls: metric name (or glob) -> {"step_metric": ...}."""
    exited: bool = False
    """The run called finish (an exit record was written)."""

    @property
    def files_dir(self) -> Path:
        """The run's ``files/`` folder (media such as tables and images)."""
        return self.path.parent / "files"

    def rows_with(self, *keys: str) -> list[dict[str, Any]]:
        """History rows that hold every one of `keys`."""
        return [row for row in self.history if all(k in row for k in keys)]

    def table(self, value: dict[str, Any]) -> dict[str, Any]:
        """The JSON of a logged table (``{"columns": [...], "data": [[...]]}``) from its history value."""
        return json.loads((self.files_dir / value["path"]).read_text(encoding="utf-8"))


def read_offline_run(path: str | Path) -> OfflineRun:
    """Parse a ``run-<id>.wandb`` file (or the ``offline-run-*`` folder holding one)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if not found:
            raise WandbLogError(f"{path}: no run-*.wandb file")
        path = found[0]
    run = OfflineRun(path=path)
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.group = r.run_id, r.project, r.run_group
            run.name, run.job_type = r.display_name, r.job_type
            run.config.update(_items_to_dict(r.config.update))
        elif kind == "config":
            run.config.update(_items_to_dict(record.config.update))
            for item in record.config.remove:
                run.config.pop(item.key, None)
        elif kind == "history":
            run.history.append(_items_to_dict(record.history.item))
        elif kind == "summary":
            run.summary.update(_items_to_dict(record.summary.update))
        elif kind == "metric":
            metric = record.metric
            name = metric.name or metric.glob_name
            run.metrics[name] = {"step_metric": metric.step_metric}
        elif kind == "exit":
            run.exited = True
    run.config.pop("_wandb", None)
    return run


def find_offline_runs(root: str | Path) -> list[Path]:
    """Every ``run-*.wandb`` file below `root` (a run directory's ``wandb/`` folder, a report folder)."""
    return sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
