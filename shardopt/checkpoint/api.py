"""``save`` and ``load``: world-size-agnostic checkpoints of a model and a shardopt optimizer."""
from __future__ import annotations

import datetime
import math
import os
import shutil
import warnings

import torch
import torch.distributed as dist

from ..kernels import state_precision
from ..kernels.state_precision import SCALE_SUFFIX
from ..optim import _steps
from ..optim._state_dict import LIVE_KEYS
from . import _storage as S
from ._live import Live, collect, state_pieces
from ._storage import FlatPieces
from ._manifest import (
    EXTRA,
    FORMAT,
    VERSION,
    _Unrestorable,
    decode_group,
    dtype_str,
    legacy_scale,
    optim_key,
    read_manifest,
    write_manifest,
)
from .errors import (
    AlgorithmMismatchError,
    CheckpointError,
    CorruptCheckpointError,
    MissingEntryError,
    ShapeMismatchError,
)

INT8_CODES = frozenset({dtype_str(torch.int8), dtype_str(torch.uint8)})  # stored dtypes of int8 state codes
_ERRORS = {c.__name__: c for c in (CheckpointError, CorruptCheckpointError, MissingEntryError, ShapeMismatchError,
                                   AlgorithmMismatchError)}
_MAX_LISTED = 8


def _world(group=None):
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def _agree(errors: list, group=None) -> None:
    """Raise the same kind of error on every rank if any rank found a problem; never hang.

    ``errors`` are (class name, message). Every rank joins the one
    all_gather_object whatever it found.
    """
    w, rank = _world(group)
    if w > 1:
        allerr: list = [None] * w
        dist.all_gather_object(allerr, errors, group=group)
    else:
        allerr = [errors]
    if not any(allerr):
        return
    mine = allerr[rank]
    if mine:
        src, errs = rank, mine
    else:
        src = next(r for r, e in enumerate(allerr) if e)
        errs = allerr[src]
    cls = _ERRORS.get(errs[0][0], CheckpointError)
    lines = [m for _, m in errs]
    msg = lines[0]
    if len(lines) > 1:
        more = lines[1:_MAX_LISTED]
        msg += "\n  also: " + "\n  also: ".join(more)
        if len(lines) > _MAX_LISTED:
            msg += f"\n  ... and {len(lines) - _MAX_LISTED} more"
    if src != rank:
        msg = f"rank {src} reported: {msg}"
    raise cls(msg)


def _err(exc: BaseException) -> tuple:
    name = type(exc).__name__
    return (name if name in _ERRORS else "CheckpointError",
            str(exc) if name in _ERRORS else f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- save
def save(path: str, model, optimizer=None, extra=None, *, model_weights: bool = True, process_group=None) -> str:
    """Write ``model`` (and ``optimizer``'s state) to the checkpoint directory ``path``.

    Collective: every rank calls it. Works for a single device, ZeRO-1, FSDP2
    and a shardopt optimizer inside a DeepSpeed ZeRO-1/2 engine (pass the
    engine as ``model``). Each rank writes only the pieces it owns; the result
    loads at any world size and in any layout (see :func:`load`).

    The write goes to ``path.tmp`` and is renamed to ``path`` only once every
    file is synced and checksummed, so a crash leaves the previous checkpoint
    whole. ``extra`` (rank 0's, any picklable object: step, LR scheduler state,
    RNG state, see :func:`rng_state`) is stored alongside and returned by
    :func:`load`. ``model_weights=False`` writes the optimizer only: the model
    then just names its parameters (the Trainer integration does this, as
    Trainer keeps the weights in ``model.safetensors``). Returns ``path``.
    """
    path = os.fspath(path).rstrip("/")
    w, rank = _world(process_group)
    errors, live = [], None
    try:
        live = collect(model, optimizer, weights=model_weights)
    except Exception as e:
        errors.append(_err(e))
    if rank == 0 and not errors:
        try:
            S.prepare_tmp(path)  # refuses a path that is a file before it touches anything
        except CheckpointError as e:
            errors.append(_err(e))
        except OSError as e:
            errors.append(("CheckpointError", f"cannot create {S.tmp_dir(path)}: {e}; {S.free_space(path)}"))
    _agree(errors, process_group)
    tmp = S.tmp_dir(path)
    state_dict = {t.key: t.value for t in live.targets() if t.value is not None and _numel(t) > 0}
    errors, sums = [], {}
    try:
        S.dcp_save(state_dict, tmp, process_group=process_group)
    except CheckpointError as e:  # torch raises on every rank; ours is an Exception and names the path
        errors.append(_err(e))
    if not errors:
        try:
            md = S.read_metadata(tmp)
            sums = S.storage_checksums(tmp, md, rank, w)
        except Exception as e:  # noqa: BLE001
            errors.append(_err(e))
    if w > 1:  # every rank's checksums, and whether every rank got them, before anything is committed
        gathered: list = [None] * w
        dist.all_gather_object(gathered, (errors, sums), group=process_group)
        errors = next((e for e, _ in gathered if e), [])
        sums = {k: v for _, d in gathered for k, v in d.items()}
    if rank == 0 and not errors:
        try:
            _finish(path, tmp, live, sums, extra)
        except CheckpointError as e:
            errors.append(_err(e))
        except (OSError, RuntimeError) as e:  # torch.save of `extra` reports a short write as RuntimeError
            errors.append(_err(S.write_failure(e, path, "writing its manifest and extra state")))
        except Exception as e:  # noqa: BLE001
            errors.append(_err(e))
    if errors and rank == 0:
        # the partial write only takes space; the previous checkpoint at `path` is untouched
        shutil.rmtree(tmp, ignore_errors=True)
    _agree(errors, process_group)
    return path


def _numel(t) -> int:
    return math.prod(t.shape)


def _finish(path, tmp, live: Live, sums: dict, extra) -> None:
    files = {}
    files[".metadata"] = S.side_file_info(os.path.join(tmp, ".metadata"))
    if extra is not None:
        ep = os.path.join(tmp, EXTRA)
        with open(ep, "wb") as f:
            torch.save(extra, f)
            f.flush()
            os.fsync(f.fileno())
        files[EXTRA] = S.side_file_info(ep)
    doc = build_manifest(live, sums, files)
    _write_manifest_hook(tmp, doc)
    S.commit(path)


def _write_manifest_hook(directory: str, doc: dict) -> None:
    # One function, so a test can stop a save right before it becomes visible.
    write_manifest(directory, doc)


def build_manifest(live: Live, sums: dict, files: dict) -> dict:
    import shardopt

    tensors = {}
    for t in live.targets():
        tensors[t.key] = {"fqn": t.fqn, "slot": t.slot, "shape": list(t.shape), "dtype": dtype_str(t.dtype),
                          "storage": "flat" if t.slot != "model" else "full"}
    model = {}
    for t in live.model_targets:
        model[t.fqn] = {"shape": list(t.shape), "dtype": dtype_str(t.dtype),
                        "kind": "buffer" if t.fqn in live.buffers else "param"}
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shardopt_version": shardopt.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "world_size": live.world_size,
        "layout": live.layout,
        "optimizer": live.optimizer_class,
        "params": live.manifest_params(),
        "param_groups": live.manifest_groups(),
        "model": model,
        "aliases": dict(live.aliases),
        "tensors": tensors,
        "checksums": sums,
        "files": files,
    }


# ---------------------------------------------------------------- load
def load(path: str, model, optimizer=None, *, strict: bool = True, keep_param_groups: bool = False,
         model_weights: bool = True, process_group=None):
    """Load checkpoint ``path`` into ``model`` (and ``optimizer``), in place; returns the saved ``extra``.

    Collective. The checkpoint may come from any world size and layout (and
    from ``shardopt ckpt split`` / ``convert``). Before reading, every rank
    checks the manifest against the live model and optimizer (missing or
    unexpected parameters with ``strict``, shapes, dtypes, the algorithm) and
    the CRC-32 of every chunk it will read; on any problem all ranks raise the
    same :class:`~shardopt.checkpoint.CheckpointError` subclass, naming the
    file and the parameter.

    The optimizer's param groups must be the saved ones (the same parameters
    in the same groups), whose hyperparameters (lr after a scheduler, betas,
    ...) are restored, as ``torch.optim.Optimizer.load_state_dict`` does.
    ``keep_param_groups=True`` is for fine-tuning with new groups: it loads
    the per-parameter state and keeps the live groups' hyperparameters.
    """
    path = os.fspath(path).rstrip("/")
    errors = []
    live = manifest = md = directory = None
    try:
        directory = S.resolve(path)
        manifest = read_manifest(directory)
        errs = S.verify_side_file(directory, manifest, ".metadata")
        if errs:
            raise CorruptCheckpointError(errs[0])
        md = S.read_metadata(directory)
        live = collect(model, optimizer, weights=model_weights)
    except Exception as e:
        errors.append(_err(e))
    state_dict, later = {}, []
    if not errors:
        try:
            errors += _check(directory, manifest, md, live, strict)
            if not errors and not keep_param_groups:
                errors += _check_groups(directory, manifest, live)
            if not errors:
                state_dict, later = _destinations(live, manifest)
                items = S.read_items(state_dict, md)
                errors += [("CorruptCheckpointError", m) for m in
                           S.verify_chunks(directory, manifest, md, [it.storage_index for it in items])]
                if EXTRA in manifest.get("files", {}):
                    errors += [("CorruptCheckpointError", m) for m in S.verify_side_file(directory, manifest, EXTRA)]
        except Exception as e:
            errors.append(_err(e))
    _agree(errors, process_group)
    S.dcp_load(state_dict, directory, process_group=process_group)
    _quantize_loaded(later, manifest)
    _upgrade_loaded(live, manifest)
    _after_load(live, manifest, keep_param_groups)
    extra = None
    if EXTRA in manifest.get("files", {}):
        extra = torch.load(os.path.join(directory, EXTRA), map_location="cpu", weights_only=False)
    return extra


def _destinations(live: Live, manifest: dict):
    """(DCP state_dict to read into, [(Quantized, fp32 local tensor)] to quantize after the read)."""
    stored = manifest["tensors"]
    out = {}
    for t in live.targets():
        if t.key not in stored or _numel(t) == 0:
            continue  # e.g. master_param the checkpoint lacks: refreshed from the weights after the load
        out[t.key] = t.value
    later = []
    for q in _from_float(live, stored):
        # fp32/bf16 state saved, int8 here: read it into an fp32 copy of this rank's piece, quantize after
        codes = q.layout.local_state(q.st[q.key])
        tmp = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
        pieces = state_pieces(q.layout, q.index, q.param, tmp, f"{q.fqn} state '{q.key}'")
        key = optim_key(q.fqn, q.key)
        if key in out:
            out[key] = FlatPieces(out[key].numel, torch.float32, pieces)
        later.append((q, tmp))
    return out, later


def _from_float(live: Live, stored: dict) -> list:
    """The live int8 states whose checkpoint entry is a plain (fp32/bf16) tensor."""
    return [q for q in live.quantized
            if optim_key(q.fqn, q.key) in stored and stored[optim_key(q.fqn, q.key)]["dtype"] not in INT8_CODES]


def _quantize_loaded(later, manifest: dict) -> None:
    params = manifest.get("params", {})
    for q, tmp in later:
        step = _steps.as_int(params.get(q.fqn, {}).get("step", 0.0))
        codes, scale = state_precision.quantize(tmp, step, state_precision.int8_kind(q.key),
                                                q.layout.int8_block(q.index))
        q.layout.local_state(q.st[q.key]).copy_(codes)
        sc = q.layout.local_state(q.st[q.key + SCALE_SUFFIX])
        sc.copy_(scale.view(sc.shape))


def _check(directory, manifest, md, live: Live, strict: bool) -> list:
    errors = []
    mpath = os.path.join(directory, "shardopt.json")
    stored = manifest.get("tensors", {})
    params = manifest.get("params", {})
    where = f"checkpoint {directory}"

    def add(cls, msg):
        errors.append((cls.__name__, msg))

    # algorithm first: the clearest explanation when everything else differs too
    for fqn, pi in live.params.items():
        sp = params.get(fqn)
        if sp is None:
            continue
        if sp["algorithm"] != pi.algorithm:
            skeys = [k for k in sp["state"] if k != "master_param"]
            lkeys = [k for k in pi.state_keys if k != "master_param"]
            add(AlgorithmMismatchError,
                f"{where} was written by {sp['algorithm']} for parameter '{fqn}' (state {', '.join(skeys) or 'none'}), "
                f"but this optimizer runs {pi.algorithm} for it (state {', '.join(lkeys) or 'none'}); "
                f"{sp['algorithm']} state cannot drive {pi.algorithm}. Build the optimizer the checkpoint came from, "
                "or load the model weights only (optimizer=None)")
    if errors:
        return errors
    live_fqns = set(live.params)
    for fqn, pi in live.params.items():
        if fqn not in params:
            add(MissingEntryError,
                f"{where} has no optimizer entry for parameter '{fqn}' (shape {tuple(pi.shape)}) in {mpath}; "
                "it was saved from a different model or optimizer. Load with optimizer=None to take the weights only")
    if strict and live.params:
        for fqn in params:
            if fqn not in live_fqns:
                add(MissingEntryError,
                    f"{where} has optimizer state for parameter '{fqn}' that this optimizer does not hold; "
                    "pass strict=False to ignore it")
    live_model = {t.fqn for t in live.model_targets}
    if strict and live.model_targets:
        for fqn in manifest.get("model", {}):
            if fqn not in live_model and fqn not in live.aliases:
                add(MissingEntryError,
                    f"{where} has model tensor '{fqn}' that the model does not have; pass strict=False to ignore it")
    converting = {(q.fqn, q.key + SCALE_SUFFIX) for q in _from_float(live, stored)}
    codes_of = {(q.fqn, q.key) for q in live.quantized}
    for t in live.targets():
        s = stored.get(t.key)
        if s is not None and t.slot != "model" and (t.fqn, t.slot) not in codes_of and \
                s["dtype"] in INT8_CODES and not t.slot.endswith(SCALE_SUFFIX):
            add(ShapeMismatchError,
                f"{where}: optimizer state '{t.slot}' of parameter '{t.fqn}' was saved as int8 blocks, but this "
                f"optimizer keeps it as {dtype_str(t.dtype)}; load it with state_dtype='int8', or write fp32 "
                "state with `shardopt ckpt consolidate` and load that with load_state_dict")
            continue
        if s is None:
            if t.slot == "master_param" or (t.fqn, t.slot) in converting:
                continue
            if t.slot == "model" or t.fqn in params:
                what = "model weight" if t.slot == "model" else f"optimizer state '{t.slot}'"
                add(MissingEntryError, f"{where} has no entry for parameter '{t.fqn}' ({what}) in {mpath}")
            continue
        what = "model tensor" if t.slot == "model" else f"optimizer state '{t.slot}' of parameter"
        if tuple(s["shape"]) != tuple(t.shape):
            add(ShapeMismatchError,
                f"{where}: {what} '{t.fqn}' has shape {tuple(s['shape'])} in the checkpoint but {tuple(t.shape)} "
                "in the model; the model's architecture differs from the one saved")
            continue
        # optimizer state converts to the live state dtype (bf16 <-> fp32 state, see optim/_state_dict.py)
        if s["dtype"] != dtype_str(t.dtype) and t.slot == "model":
            add(ShapeMismatchError,
                f"{where}: {what} '{t.fqn}' is {s['dtype']} in the checkpoint but {dtype_str(t.dtype)} in the "
                "model; cast the model to the saved dtype before loading (or save again in this dtype)")
            continue
        if _numel(t) == 0:
            continue  # nothing stored for empty tensors
        dm = md.state_dict_metadata.get(t.key)
        if dm is None:
            add(CorruptCheckpointError,
                f"{os.path.join(directory, '.metadata')} lacks '{t.key}' (parameter '{t.fqn}') that {mpath} lists")
            continue
        if tuple(getattr(dm, "size", ())) != tuple(t.storage_shape):
            add(CorruptCheckpointError,
                f"{os.path.join(directory, '.metadata')} stores '{t.key}' (parameter '{t.fqn}') with shape "
                f"{tuple(dm.size)}, expected {tuple(t.storage_shape)}")
    if not live.model_targets:  # optimizer only: the parameter dtypes still have to agree
        for fqn, pi in live.params.items():
            sp = params.get(fqn)
            if sp and sp["dtype"] != dtype_str(pi.dtype):
                add(ShapeMismatchError,
                    f"{where}: parameter '{fqn}' is {sp['dtype']} in the checkpoint but {dtype_str(pi.dtype)} here")
    return errors


def _upgrade_loaded(live: Live, manifest: dict) -> None:
    """Give tensors read from an older checkpoint version today's meaning (Muon's momentum: sum -> EMA)."""
    for t in live.optim_targets:
        scale = legacy_scale(manifest, t.key)
        if scale is None:
            continue
        for _, piece in t.value.pieces:
            piece.mul_(scale)


def _check_groups(directory, manifest, live: Live) -> list:
    """The live param groups must partition the parameters as the saved ones did."""
    if not live.groups:
        return []
    live_fqns = {f for _, fqns in live.groups for f in fqns}
    saved_fqns = {f for g in manifest.get("param_groups", []) for f in g.get("params", [])}
    # only the parameters both sides hold (strict=False may load a subset)
    saved = [[f for f in g.get("params", []) if f in live_fqns] for g in manifest.get("param_groups", [])]
    saved = [g for g in saved if g]
    mine = [[f for f in fqns if f in saved_fqns] for _, fqns in live.groups]
    mine = [g for g in mine if g]
    if not saved or [sorted(g) for g in saved] == [sorted(g) for g in mine]:
        return []

    def show(groups):
        return "; ".join(f"group {k}: {len(g)} params ({', '.join(g[:2])}{', ...' if len(g) > 2 else ''})"
                         for k, g in enumerate(groups))

    return [("CheckpointError",
             f"checkpoint {directory} was saved with {len(saved)} param group(s) [{show(saved)}] but the optimizer "
             f"has {len(mine)} [{show(mine)}]; loading would overwrite the groups' hyperparameters with the wrong "
             "ones. Build the optimizer with the saved groups, or pass keep_param_groups=True to load the "
             "per-parameter state and keep this optimizer's group hyperparameters")]


def _after_load(live: Live, manifest: dict, keep_param_groups: bool = False) -> None:
    params = manifest.get("params", {})
    stored = manifest.get("tensors", {})
    for fqn, pi in live.params.items():
        sp = params.get(fqn)
        if sp is None:
            continue
        for st in pi.step_states:
            st["step"] = _steps.as_int(sp.get("step", 0.0))
    rebuilt = []
    for fqn, refresh in live.refresh_master:
        if getattr(refresh, "always", False):
            refresh()
        elif f"optim.{fqn}.master_param" not in stored:
            refresh()
            rebuilt.append(fqn)
    for requantize in live.requantize:  # int8 state of DeepSpeed partitions, read as fp32 (see _live)
        requantize()
    if rebuilt:
        warnings.warn(f"shardopt: the checkpoint has no fp32 master copy of {len(rebuilt)} low-precision "
                      f"parameter(s) (e.g. '{rebuilt[0]}'); rebuilt from the weights", RuntimeWarning, stacklevel=3)
    # hyperparameters (lr after a scheduler, betas, ...) as torch.optim.Optimizer.load_state_dict restores them
    if keep_param_groups:
        return
    saved_groups = manifest.get("param_groups", [])
    for group, fqns in live.groups:
        if not fqns or fqns[0] not in params:
            continue
        gi = params[fqns[0]]["group"]
        if gi >= len(saved_groups):
            continue
        for k, v in decode_group(saved_groups[gi]["hyper"]).items():
            if k == "algorithm" or k in LIVE_KEYS or isinstance(v, _Unrestorable):
                continue
            group[k] = v


# ---------------------------------------------------------------- helpers
def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA if present, Python ``random``) for ``extra``."""
    import random

    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import random

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
