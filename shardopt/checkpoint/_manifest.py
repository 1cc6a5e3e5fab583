"""The manifest (``shardopt.json``): what a checkpoint holds, and its checksums.

One small JSON file per checkpoint, written last, so a directory without it
is an incomplete save. It records, per optimizer parameter FQN, the logical
shape, dtype, algorithm, step and state keys; per model tensor its shape and
dtype; the param groups' hyperparameters; the world size and layout it was
written with; and a CRC-32 per stored chunk (``key@offsets``) and per side
file. The manifest carries a CRC-32 of itself, so an edited or damaged
manifest is caught too.
"""
from __future__ import annotations

import json
import os
import zlib

import torch

from .errors import CheckpointError, CorruptCheckpointError

FORMAT = "shardopt-checkpoint"
# 2: Muon's momentum_buffer is the EMA torch.optim.Muon keeps; 1 stored the sum m = mu*m + g
VERSION = 2
MANIFEST = "shardopt.json"
EXTRA = "extra.pt"
DCP_METADATA = ".metadata"
CONSOLIDATED_FORMAT = "shardopt-consolidated"

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."

LOW_PRECISION = ("bfloat16", "float16")


def model_key(fqn: str) -> str:
    return MODEL_PREFIX + fqn


def optim_key(fqn: str, state_key: str) -> str:
    return f"{OPTIM_PREFIX}{fqn}.{state_key}"


def chunk_id(key: str, offsets) -> str:
    return f"{key}@{','.join(str(int(o)) for o in offsets)}"


# ---------------------------------------------------------------- dtypes
def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def str_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint manifest")
    return dt


# ---------------------------------------------------------------- checksums
def crc32_bytes(data, crc: int = 0) -> int:
    return zlib.crc32(data, crc) & 0xFFFFFFFF


def crc32_file_range(path: str, offset: int, length: int, block: int = 8 << 20) -> int:
    """CRC-32 of ``length`` bytes at ``offset``; raises EOFError if the file is shorter."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            buf = f.read(min(block, left))
            if not buf:
                raise EOFError(path)
            crc = zlib.crc32(buf, crc)
            left -= len(buf)
    return crc & 0xFFFFFFFF


def crc32_tensor(t: torch.Tensor) -> int:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return 0
    return crc32_bytes(t.view(-1).view(torch.uint8).numpy().tobytes())


# ---------------------------------------------------------------- hyperparameters
def encode_value(v):
    """JSON-able form of a param-group hyperparameter; tuples, dtypes and scalar tensors survive."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return {"__tuple__": [encode_value(x) for x in v]}
    if isinstance(v, list):
        return [encode_value(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"__dict__": {k: encode_value(x) for k, x in v.items()}}
    if isinstance(v, torch.dtype):
        return {"__dtype__": dtype_str(v)}
    if torch.is_tensor(v) and v.numel() == 1:
        return {"__tensor__": v.item(), "dtype": dtype_str(v.dtype)}
    return {"__repr__": repr(v)}


def decode_value(v):
    if isinstance(v, list):
        return [decode_value(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tuple__" in v:
        return tuple(decode_value(x) for x in v["__tuple__"])
    if "__dict__" in v:
        return {k: decode_value(x) for k, x in v["__dict__"].items()}
    if "__dtype__" in v:
        return str_dtype(v["__dtype__"])
    if "__tensor__" in v:
        return torch.tensor(v["__tensor__"], dtype=str_dtype(v["dtype"]))
    if "__repr__" in v:
        return _Unrestorable(v["__repr__"])
    return v


def legacy_scale(manifest: dict, key: str) -> float | None:
    """The factor that turns stored tensor ``key`` of an older checkpoint into today's meaning, or None.

    Version 1 kept Muon's momentum as the sum ``m = mu*m + g``; the EMA is ``(1 - mu)`` times it.
    """
    if manifest.get("version", 1) >= 2:
        return None
    t = manifest.get("tensors", {}).get(key) or {}
    if t.get("slot") != "momentum_buffer":
        return None
    p = manifest.get("params", {}).get(t.get("fqn")) or {}
    if p.get("algorithm") != "muon":
        return None
    groups = manifest.get("param_groups", [])
    g = groups[p["group"]] if p.get("group", -1) < len(groups) else {}
    mu = decode_value(g.get("hyper", {}).get("momentum", 0.95))
    return 1.0 - float(mu)


class _Unrestorable:
    """A hyperparameter that could not be stored in JSON; loading keeps the live value."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return f"<unrestorable {self.text}>"


def encode_group(group: dict) -> dict:
    return {k: encode_value(v) for k, v in group.items() if k not in ("params", "param_names")}


def decode_group(hyper: dict) -> dict:
    return {k: decode_value(v) for k, v in hyper.items()}


# ---------------------------------------------------------------- read / write
def _body_crc(doc: dict) -> int:
    body = {k: v for k, v in doc.items() if k != "manifest_crc32"}
    return crc32_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_manifest(directory: str, doc: dict) -> None:
    doc = dict(doc)
    doc["manifest_crc32"] = _body_crc(doc)
    path = os.path.join(directory, MANIFEST)
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoints_in(directory: str) -> list[str]:
    """The checkpoints directly inside ``directory`` (subfolders with a manifest), sorted by name."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names
            if not n.endswith((".tmp", ".old")) and os.path.isfile(os.path.join(directory, n, MANIFEST))]


def why_not_a_checkpoint(directory: str) -> str:
    """Why ``directory``, which exists but has no manifest, is not a checkpoint: only what its files show."""
    directory = directory.rstrip("/") or directory
    inside = checkpoints_in(directory)
    if inside:
        names = ", ".join(os.path.basename(c) for c in inside)
        return (f"{directory} is a folder of {len(inside)} shardopt checkpoint(s) ({names}), not a checkpoint "
                f"itself; name one of them, e.g. {inside[0]}")
    partial = os.path.exists(os.path.join(directory, MANIFEST + ".part"))
    if directory.endswith(".tmp") or partial:
        prev = directory[: -len(".tmp")] if directory.endswith(".tmp") else None
        tail = (f"; the previous checkpoint, if there was one, is {prev}" if prev else
                "; use the previous checkpoint")
        return f"{directory} is an interrupted save: its {MANIFEST} was never completed{tail}"
    try:
        files = os.listdir(directory)
    except OSError:
        files = []
    if DCP_METADATA in files or any(f.endswith(".distcp") for f in files):
        return (f"{directory} holds torch.distributed.checkpoint files but no {MANIFEST}: it was not written by "
                "shardopt.checkpoint.save (or the manifest was not copied with it)")
    return f"{directory} is not a shardopt checkpoint: it has no {MANIFEST}"


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint at {directory}: the directory does not exist")
    if not os.path.exists(path):
        raise CheckpointError(why_not_a_checkpoint(directory))
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint manifest {path} is unreadable or truncated: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shardopt checkpoint manifest (format {doc.get('format')!r})")
    if doc.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} has format version {doc.get('version')}, newer than this shardopt reads ({VERSION}); upgrade shardopt"
        )
    if doc.get("manifest_crc32") != _body_crc(doc):
        raise CorruptCheckpointError(
            f"checkpoint manifest {path} fails its checksum: it was edited or damaged after the save"
        )
    return doc
