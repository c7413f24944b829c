"""Read an offline W&B run file (`run-<id>.wandb`) without a server: the records are protobufs in
LevelDB-log framing (32 KiB blocks; each chunk: crc32, uint16 length, type FULL/FIRST/MIDDLE/LAST)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending + chunk if kind == LAST else chunk)
            records.append(record)
            pending = b""
        else:  # zero padding at the end of a file still being written
            break
    return records


def run_summary(path: str | Path) -> dict[str, Any]:
    """{"run_id": ..., "config": {top-level key: value}, "history": {metric name: [logged values]}}."""
    run_id, config, history = None, {}, {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        else:
            if kind == "history":
                for item in record.history.item:
                    history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
            continue
        for item in items:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"run_id": run_id, "config": config, "history": history}
