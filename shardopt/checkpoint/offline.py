"""Offline tools on checkpoint directories: inspect, verify, consolidate, split.

Single process, no torch.distributed. Everything streams one tensor at a
time: reads go through DCP's storage reader per tensor, the consolidated
``torch.save`` file is laid out first with its storages left empty
(``torch.serialization.skip_data``) and then filled in place through a shared
memory map, and writes produce each tensor only when DCP writes it. Peak
memory stays near the largest tensor, not the model.
"""
from __future__ import annotations

import datetime
import math
import mmap
import os
from collections import OrderedDict

import torch

from ..kernels import state_precision
from ..kernels.state_precision import SCALE_SUFFIX
from ..optim._report import format_bytes
from . import _storage as S
from ._manifest import (
    CONSOLIDATED_FORMAT,
    EXTRA,
    FORMAT,
    MANIFEST,
    VERSION,
    checkpoints_in,
    decode_group,
    dtype_str,
    legacy_scale,
    encode_value,
    model_key,
    optim_key,
    read_manifest,
    str_dtype,
    write_manifest,
)
from .errors import CheckpointError, CorruptCheckpointError

STATE_FORMAT = 2  # the optimizer state_dict format shardopt.optim writes (see optim/_state_dict.py)


def _bar(total, desc, progress, unit="tensor"):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or not progress:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


def folder_of_checkpoints(path: str) -> list[str]:
    """The checkpoints inside ``path`` when it is a folder of them (as ``shardopt demo`` writes), not one itself."""
    path = os.fspath(path).rstrip("/") or os.fspath(path)
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, MANIFEST)):
        return []
    return checkpoints_in(path)


def _open(path):
    directory = S.resolve(path)
    manifest = read_manifest(directory)
    return directory, manifest


def _elem(dtype_name: str) -> int:
    return torch.empty((), dtype=str_dtype(dtype_name)).element_size()


# ---------------------------------------------------------------- inspect
def inspect(path: str) -> dict:
    """A summary of checkpoint ``path``: header fields and one row per tensor owner (parameter/buffer)."""
    directory, m = _open(path)
    rows = []
    params = m.get("params", {})
    model = m.get("model", {})
    tensors = m.get("tensors", {})
    names = list(model) + [f for f in params if f not in model]
    for fqn in names:
        info = model.get(fqn) or params.get(fqn)
        p = params.get(fqn)
        nbytes = 0
        if fqn in model:
            nbytes += math.prod(model[fqn]["shape"]) * _elem(model[fqn]["dtype"])
        keys = list(p["state"]) if p else []
        sdtypes = []
        sbytes = 0
        for k in keys:
            t = tensors.get(optim_key(fqn, k))
            if t:
                sbytes += math.prod(t["shape"]) * _elem(t["dtype"])
                # int8 state: its codes (int8, or uint8 for AdamW's second moment) plus "<key>_scale" (fp32)
                quantized = k + SCALE_SUFFIX in keys
                shown = "int8" if quantized else t["dtype"]
                if k != "master_param" and not _is_scale(k, keys) and shown not in sdtypes:
                    sdtypes.append(shown)
        rows.append({
            "name": fqn, "shape": list(info["shape"]), "dtype": info["dtype"],
            "kind": (model.get(fqn) or {}).get("kind", "param"),
            "algorithm": p["algorithm"] if p else "-", "group": p["group"] if p else None,
            "state": keys, "state_dtype": ",".join(sdtypes) or None, "step": p["step"] if p else None,
            "bytes": nbytes + sbytes, "state_bytes": sbytes,
        })
    algos = sorted({p["algorithm"] for p in params.values()})
    return {
        "path": directory, "world_size": m.get("world_size"), "layout": m.get("layout"),
        "optimizer": m.get("optimizer"), "algorithms": algos, "created": m.get("created"),
        "version": m.get("version"), "torch_version": m.get("torch_version"),
        "groups": [decode_group(g["hyper"]) | {"n_params": len(g["params"])} for g in m.get("param_groups", [])],
        "rows": rows, "total_bytes": sum(r["bytes"] for r in rows),
        "state_bytes": sum(r["state_bytes"] for r in rows), "extra": EXTRA in m.get("files", {}),
        "files": sorted({c["file"] for c in m.get("checksums", {}).values()}),
    }


def format_inspect(info: dict) -> str:
    out = [
        f"checkpoint  {info['path']}",
        f"written by  {info['optimizer'] or '-'} ({', '.join(info['algorithms']) or 'no optimizer'}), "
        f"layout {info['layout']}, world size {info['world_size']}",
        f"created     {info['created']}  (format v{info['version']}, torch {info['torch_version']})",
        f"files       {len(info['files'])} data files, extra state: {'yes' if info['extra'] else 'no'}",
    ]
    for gi, g in enumerate(info["groups"]):
        alg = g.get("algorithm")
        hp = ", ".join(f"{k}={_short(v)}" for k, v in sorted(g.items()) if _shown(k, alg))
        out.append(f"group {gi}     {g['n_params']} params, {alg or '?'}: {hp}")
    hdr = ("name", "shape", "dtype", "algorithm", "state keys", "state dtype", "step", "bytes")
    rows = [(r["name"] + (" (buffer)" if r["kind"] == "buffer" else ""), "x".join(map(str, r["shape"])) or "()",
             r["dtype"], r["algorithm"], ",".join(r["state"]) or "-", r.get("state_dtype") or "-",
             "-" if r["step"] is None else f"{r['step']:g}", format_bytes(r["bytes"])) for r in info["rows"]]
    w = [max([len(h)] + [len(r[c]) for r in rows]) for c, h in enumerate(hdr)]
    last = len(hdr) - 1  # bytes: right-aligned
    out.append("")
    out.append("  ".join(h.ljust(w[c]) if c < last else h.rjust(w[c]) for c, h in enumerate(hdr)))
    out.append("  ".join("-" * x for x in w))
    for r in rows:
        out.append("  ".join(v.ljust(w[c]) if c < last else v.rjust(w[c]) for c, v in enumerate(r)))
    sdt = sorted({d for r in info["rows"] for d in (r.get("state_dtype") or "").split(",") if d})
    out.append(f"total {len(rows)} tensors, {format_bytes(info['total_bytes'])}, of which optimizer state "
               f"{format_bytes(info.get('state_bytes', 0))}{' (' + ', '.join(sdt) + ')' if sdt else ''} "
               "(shardopt ckpt inspect --json gives exact bytes)")
    return "\n".join(out)


def _shown(key: str, algorithm) -> bool:
    """Whether a param-group setting belongs on that group's line: not the group size, not the algorithm
    (already named), and not another algorithm's setting (a Muon optimizer's defaults also fill its
    auxiliary AdamW group, as torch.optim fills every group)."""
    from ..optim.base import ALGORITHMS

    if key in ("n_params", "algorithm"):
        return False
    own = ALGORITHMS.get(algorithm)
    if own is None or key in own.defaults:
        return True
    return not any(key in a.defaults for a in ALGORITHMS.values())


def _short(v):
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "(" + ",".join(_short(x) for x in v) + ")"
    return str(v)


def read_extra(path: str):
    """The ``extra`` object a checkpoint was saved with (None if none), after checking its CRC-32.

    ``extra.pt`` is a pickle: read only checkpoints you trust.
    """
    directory, m = _open(path)
    if EXTRA not in m.get("files", {}):
        return None
    errs = S.verify_side_file(directory, m, EXTRA)
    if errs:
        raise CorruptCheckpointError(errs[0])
    return torch.load(os.path.join(directory, EXTRA), map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- verify
def verify(path: str, progress: bool = False) -> tuple[int, list[str]]:
    """Check every stored chunk and side file against the manifest. Returns (chunks checked, errors)."""
    try:
        directory, m = _open(path)
    except CheckpointError as e:
        return 0, [str(e)]
    errors = S.verify_side_file(directory, m, ".metadata")
    if errors:
        return 0, errors
    try:
        md = S.read_metadata(directory)
    except CheckpointError as e:
        return 0, [str(e)]
    for key in m.get("tensors", {}):
        if key not in md.state_dict_metadata and math.prod(m["tensors"][key]["shape"]) > 0:
            errors.append(f"{os.path.join(directory, '.metadata')} lacks '{key}' "
                          f"({S.owner_of_key(key, m)}) that the manifest lists")
    indices = list(md.storage_data.keys())
    with _bar(len(indices), "verify", progress, "chunk") as bar:
        for k in range(0, len(indices), 64):
            batch = indices[k:k + 64]
            errors += S.verify_chunks(directory, m, md, batch)
            bar.update(len(batch))
    if EXTRA in m.get("files", {}):
        errors += S.verify_side_file(directory, m, EXTRA)
    return len(indices), errors


# ---------------------------------------------------------------- consolidate
def _fake(shape, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(tuple(shape), dtype=dtype)


def save_streaming(skeleton: dict, out: str, fill) -> None:
    """``torch.save`` a structure whose tensors are filled one at a time by ``fill(loaded_structure)``.

    The file is first written with empty storages (fake tensors under
    ``skip_data``), then memory-mapped shared and filled in place, so the
    tensors never all sit in memory together. Written to ``out.part`` and
    renamed, so ``out`` is never half-written.
    """
    from torch.serialization import set_default_mmap_options, skip_data

    part = out + ".part"
    with skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, part)
    with set_default_mmap_options(mmap.MAP_SHARED):
        loaded = torch.load(part, mmap=True, weights_only=False, map_location="cpu")
    fill(loaded)
    del loaded
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, out)


def _tensors_of(obj, out):
    if torch.is_tensor(obj):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_of(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_of(v, out)
    return out


def consolidate(path: str, out: str, progress: bool = False) -> dict:
    """Write checkpoint ``path`` as one ``torch.save`` file in ``torch.optim`` format.

    The file is an optimizer ``state_dict`` (``"state"`` keyed by position,
    ``"param_groups"`` with ``"params"`` and ``"param_names"``), full-shape
    fp32 state, loadable by ``opt.load_state_dict`` of a single-process
    shardopt optimizer or the matching ``torch.optim`` one. It also holds
    ``"model"`` (FQN -> tensor), ``"extra"`` and ``"shardopt"`` (the manifest
    summary), which ``load_state_dict`` ignores. Returns the ``shardopt`` dict.
    """
    directory, m = _open(path)
    md = S.read_metadata(directory)
    reader = S.TensorReader(directory, md)
    params, tensors = m.get("params", {}), m.get("tensors", {})
    groups, order = [], []
    for g in m.get("param_groups", []):
        hyper = decode_group(g["hyper"])
        hyper = {k: v for k, v in hyper.items() if type(v).__name__ != "_Unrestorable"}
        idx = list(range(len(order), len(order) + len(g["params"])))
        order += g["params"]
        groups.append({**hyper, "params": idx, "param_names": list(g["params"]), "shardopt_format": STATE_FORMAT})
    state, fills = {}, []
    for i, fqn in enumerate(order):
        p = params[fqn]
        st = {"step": _fake((), torch.float32)}
        fills.append((("state", i, "step"), None, p.get("step", 0.0)))
        for k in p["state"]:
            if _is_scale(k, p["state"]):
                continue  # read with its codes, below
            key = optim_key(fqn, k)
            t = tensors[key]
            if k + SCALE_SUFFIX in p["state"]:  # int8 blocks: dequantized to fp32
                st[k] = _fake(p["shape"], torch.float32)
                fills.append((("state", i, k), (key, optim_key(fqn, k + SCALE_SUFFIX), k), None))
                continue
            st[k] = _fake(p["shape"], _torch_state_dtype(str_dtype(t["dtype"])))
            fills.append((("state", i, k), key, None))
        state[i] = st
    model = OrderedDict()
    for fqn, info in m.get("model", {}).items():
        model[fqn] = _fake(info["shape"], str_dtype(info["dtype"]))
        fills.append((("model", fqn), model_key(fqn), None))
    extra = None
    if EXTRA in m.get("files", {}):
        errs = S.verify_side_file(directory, m, EXTRA)
        if errs:
            raise CorruptCheckpointError(errs[0])
        extra = torch.load(os.path.join(directory, EXTRA), map_location="cpu", weights_only=False)
    meta = {
        "format": CONSOLIDATED_FORMAT, "version": VERSION,
        "source": {k: m.get(k) for k in ("world_size", "layout", "optimizer", "created", "shardopt_version")},
        "params": params, "model": m.get("model", {}), "aliases": m.get("aliases", {}),
        "param_groups": m.get("param_groups", []),
    }
    skeleton = {"state": state, "param_groups": groups, "model": model, "extra": extra, "shardopt": meta}

    def fill(loaded):
        with _bar(len(fills), "consolidate", progress) as bar:
            for where, key, value in fills:
                dest = loaded
                for w in where:
                    dest = dest[w]
                if key is None:
                    dest.fill_(value)
                elif isinstance(key, tuple):
                    _read_int8(reader, directory, m, md, key, dest)
                else:
                    _read_checked(reader, directory, m, md, key, dest)
                bar.update()
        if extra is not None:
            got, want = _tensors_of(loaded["extra"], []), _tensors_of(extra, [])
            if len(got) != len(want):
                raise CheckpointError("the checkpoint's extra state holds tensors inside objects that cannot be "
                                      "streamed; consolidate cannot copy it")
            for a, b in zip(got, want):
                a.copy_(b)

    save_streaming(skeleton, out, fill)
    return meta


def _is_scale(key: str, keys) -> bool:
    """Whether state ``key`` holds the block scales of another key's int8 codes."""
    return key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) in keys


def _read_int8(reader, directory, m, md, keys, dest):
    """Read int8 codes and their block scales, and write their fp32 values into ``dest``."""
    codes_key, scale_key, k = keys
    tensors = m["tensors"]
    codes = torch.empty(dest.shape, dtype=str_dtype(tensors[codes_key]["dtype"]))
    scale = torch.empty(tuple(tensors[scale_key]["shape"]), dtype=torch.float32)
    _read_checked(reader, directory, m, md, codes_key, codes)
    _read_checked(reader, directory, m, md, scale_key, scale)
    # the block: the parameter's own (shardopt's layouts), or 256 (scales that are not a row shape)
    block = codes.numel() // scale.numel() if scale.dim() == 2 and codes.numel() % scale.numel() == 0 else \
        state_precision.BLOCK
    dest.copy_(state_precision.dequantize(codes, scale, state_precision.int8_kind(k), block))


def _torch_state_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype a consolidated (torch.optim) state tensor gets: fp32 for low-precision state (bf16 widens
    exactly), the stored one otherwise (fp32, fp64, complex)."""
    return torch.float32 if stored in (torch.bfloat16, torch.float16) else stored


def _read_checked(reader, directory, m, md, key, dest):
    """Read stored tensor ``key`` into ``dest`` (its logical shape), checking its chunks' CRC-32 first."""
    stored = m["tensors"][key]
    if dest.numel() == 0:
        return
    errs = S.verify_chunks(directory, m, md, reader.chunks.get(key, []))
    if errs:
        raise CorruptCheckpointError(errs[0])
    if stored.get("storage") == "flat":
        reader.read_into(key, dest.view(-1), offset=0)
    else:
        reader.read_into(key, dest)
    scale = legacy_scale(m, key)
    if scale is not None:
        dest.mul_(scale)


# ---------------------------------------------------------------- split and the offline writer
def write_checkpoint(path: str, *, params: dict, param_groups: list, model: dict, aliases: dict, sources: dict,
                     world_size, layout, optimizer, extra=None, extra_bytes: bytes | None = None,
                     progress: bool = False) -> str:
    """Write a checkpoint directory from tensor producers, single process, one tensor in memory at a time.

    ``sources``: DCP key -> (fqn, slot, logical shape, dtype, make()) where
    make() returns the full logical tensor; optimizer state is stored flat.
    """
    import shardopt

    path = os.fspath(path).rstrip("/")
    tmp = S.prepare_tmp(path)
    bar = _bar(len(sources), "write", progress)
    sd, tensors = {}, {}
    for key, (fqn, slot, shape, dtype, make) in sources.items():
        flat = slot != "model"
        numel = math.prod(shape)
        tensors[key] = {"fqn": fqn, "slot": slot, "shape": list(shape), "dtype": dtype_str(dtype),
                        "storage": "flat" if flat else "full"}
        if numel == 0:
            continue

        def produce(make=make, flat=flat, numel=numel, dtype=dtype, shape=shape):
            t = make().to(dtype)
            bar.update()
            return t.reshape(numel) if flat else t.reshape(shape)

        sd[key] = S.LazyTensor((numel,) if flat else tuple(shape), dtype, produce)
    S.dcp_save(sd, tmp, per_item_files=True, no_dist=True)
    bar.close()
    md = S.read_metadata(tmp)
    sums = S.storage_checksums(tmp, md)
    files = {".metadata": S.side_file_info(os.path.join(tmp, ".metadata"))}
    if extra is not None or extra_bytes is not None:
        ep = os.path.join(tmp, EXTRA)
        with open(ep, "wb") as f:
            if extra_bytes is not None:
                f.write(extra_bytes)
            else:
                torch.save(extra, f)
            f.flush()
            os.fsync(f.fileno())
        files[EXTRA] = S.side_file_info(ep)
    doc = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shardopt_version": shardopt.__version__, "torch_version": torch.__version__.split("+")[0],
        "world_size": world_size, "layout": layout, "optimizer": optimizer,
        "params": params, "param_groups": param_groups, "model": model, "aliases": aliases,
        "tensors": tensors, "checksums": sums, "files": files,
    }
    write_manifest(tmp, doc)
    S.commit(path)
    return path


def _infer_algorithm(group: dict, state: dict) -> str:
    if "algorithm" in group:
        return group["algorithm"]
    keys = {k for k in state if k not in ("step", "master_param")}
    if keys == {"exp_avg", "exp_avg_sq"}:
        return "adamw"
    if keys == {"momentum_buffer"}:
        return "muon" if "ns_steps" in group else "lion"
    raise CheckpointError(f"cannot tell the algorithm of a param group with state keys {sorted(keys)}; "
                          "it needs an 'algorithm' key")


def split(pt: str, path: str, progress: bool = False) -> str:
    """The reverse of :func:`consolidate`: a ``torch.save`` optimizer state dict -> checkpoint directory.

    Takes a file written by ``consolidate``, or a plain ``torch.optim``
    state dict whose groups carry ``param_names`` (model weights then come
    from a ``"model"`` entry if there is one).
    """
    sd = torch.load(pt, mmap=True, weights_only=False, map_location="cpu")
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise CheckpointError(f"{pt} is not an optimizer state dict (needs 'state' and 'param_groups')")
    meta = sd.get("shardopt") or {}
    src = meta.get("source", {})
    mparams = meta.get("params", {})
    params, groups, sources = {}, [], {}
    for gi, g in enumerate(sd["param_groups"]):
        names = g.get("param_names")
        if names is None or len(names) != len(g["params"]):
            raise CheckpointError(f"{pt}: param group {gi} has no 'param_names'; a checkpoint is keyed by FQN. "
                                  "Build the optimizer with named parameters (torch >= 2.6) or from shardopt.muon_param_groups")
        fqns = []
        for idx, fqn in zip(g["params"], names):
            st = sd["state"].get(idx, {})
            algo = (mparams.get(fqn) or {}).get("algorithm") or _infer_algorithm(g, st)
            keys = [k for k, v in st.items() if k != "step" and torch.is_tensor(v)]
            shape = None
            # a consolidated file of format version 1 kept Muon's momentum as the plain sum
            old_sum = algo == "muon" and meta and meta.get("version", 1) < 2
            for k in keys:
                shape = tuple(st[k].shape)
                scale = 1.0 - float(g.get("momentum", 0.95)) if old_sum and k == "momentum_buffer" else None
                sources[optim_key(fqn, k)] = (fqn, k, shape, st[k].dtype,
                                              (lambda t=st[k]: t) if scale is None else (lambda t=st[k], s=scale: t * s))
            mp = mparams.get(fqn, {})
            if shape is None:
                shape = tuple(mp.get("shape", ()))
            model_t = (sd.get("model") or {}).get(fqn)
            pdtype = mp.get("dtype") or (dtype_str(model_t.dtype) if model_t is not None else "float32")
            step = st.get("step", mp.get("step", 0.0))
            params[fqn] = {"shape": list(shape), "dtype": pdtype, "algorithm": algo, "group": gi, "state": keys,
                           "step": float(step)}
            fqns.append(fqn)
        hyper = {k: v for k, v in g.items() if k not in ("params", "param_names", "shardopt_format")}
        groups.append({"hyper": {k: encode_value(v) for k, v in hyper.items()}, "params": fqns})
    model = {}
    kinds = meta.get("model", {})
    for fqn, t in (sd.get("model") or {}).items():
        model[fqn] = {"shape": list(t.shape), "dtype": dtype_str(t.dtype),
                      "kind": (kinds.get(fqn) or {}).get("kind", "param")}
        sources[model_key(fqn)] = (fqn, "model", tuple(t.shape), t.dtype, lambda t=t: t)
    return write_checkpoint(
        path, params=params, param_groups=groups, model=model, aliases=meta.get("aliases", {}), sources=sources,
        world_size=src.get("world_size", 1), layout=src.get("layout", "none"),
        optimizer=src.get("optimizer"), extra=sd.get("extra"), progress=progress,
    )


def read_full(path: str, key: str) -> torch.Tensor:
    """One stored tensor in its logical shape (a test and debugging helper)."""
    directory, m = _open(path)
    md = S.read_metadata(directory)
    t = m["tensors"][key]
    dest = torch.empty(t["shape"], dtype=str_dtype(t["dtype"]))
    _read_checked(S.TensorReader(directory, md), directory, m, md, key, dest)
    return dest
