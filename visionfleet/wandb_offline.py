"""Read an offline W&B run (``offline-run-*/run-*.wandb``) without uploading it.

wandb-core writes offline runs as a LevelDB-style log of protobuf ``Record`` messages
and, since 0.2x, no ``wandb-summary.json``; this reader recovers the history rows and
the final summary so tests and reports can check what was logged. Format: a 7-byte
header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks with a 7-byte
chunk header (crc32, length, type FULL/FIRST/MIDDLE/LAST).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

__all__ = ["read_records", "read_run", "find_runs"]

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos = _HEADER
    pending = b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < _HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - (pos % _BLOCK) if pos % _BLOCK else 0
        else:
            raise ValueError(f"corrupt W&B log at byte {pos}")


def read_records(path: str | Path):
    """Yield ``wandb_internal_pb2.Record`` messages from a ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _chunks(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"history": [row, ...], "summary": {...}, "config": {...}}`` of one offline run."""
    run_dir = Path(run_dir)
    files = list(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb in {run_dir}")
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for rec in read_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in rec.history.item}
            history.append(row)
            summary.update({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "summary":
            for i in rec.summary.update:
                summary[_key(i)] = json.loads(i.value_json)
            for i in rec.summary.remove:
                summary.pop(_key(i), None)
        elif kind == "config":
            for i in rec.config.update:
                config[_key(i)] = json.loads(i.value_json)
    return {"history": history, "summary": summary, "config": config}


def find_runs(wandb_dir: str | Path) -> list[Path]:
    """Offline run folders under a W&B dir, oldest first."""
    return sorted(Path(wandb_dir).rglob("offline-run-*"))
