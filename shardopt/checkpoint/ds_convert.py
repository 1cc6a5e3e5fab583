"""Convert between DeepSpeed ZeRO-1/2 checkpoints and shardopt checkpoints.

DeepSpeed's ZeRO-1/2 layout (read from its checkpoint files, DeepSpeed
0.19): per optimizer param group, the group's (bit16) parameters are
concatenated in order, each followed by an optional alignment padding
(``param_alignment_paddings``), and the whole padded to a multiple of
``2 * dp_world_size`` elements. Rank ``r`` owns the ``r``-th of ``W`` equal
partitions ``[r*P, (r+1)*P)``. Its file
``{bf16_}zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` holds the inner
optimizer's state dict over that flat partition (``base_optimizer_state``)
and the fp32 master partition without its trailing padding
(``single_partition_of_fp32_groups``). ``mp_rank_00_model_states.pt`` holds
the module's weights, ``param_shapes`` (the names and order of every group)
and ``dp_world_size``.

Reading: each parameter's state is the slice ``[offset, offset+numel)`` of
the concatenated partitions; files are opened memory-mapped, so one
parameter at a time is materialized. Writing: for a new world size M the same
arithmetic lays the groups out for M ranks; each rank file is written with
empty storages and filled in place (see ``offline.save_streaming``).
"""
from __future__ import annotations

import glob
import math
import os
import warnings
from collections import OrderedDict

import torch

from ..optim.base import ALGORITHMS

from . import _storage as S
from ._manifest import (
    legacy_scale,
    EXTRA,
    LOW_PRECISION,
    decode_group,
    dtype_str,
    encode_value,
    model_key,
    optim_key,
    read_manifest,
    str_dtype,
)
from .errors import CheckpointError, CorruptCheckpointError
from .offline import (
    _bar,
    _fake,
    _read_checked,
    save_streaming,
    verify,
    write_checkpoint,
)

MODEL_FILE = "mp_rank_00_model_states.pt"
NCCL_START_ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor (stage 1/2)
LION_KEYS = {"exp_avg": "momentum_buffer"}  # DeepSpeed Lion -> shardopt
ADAM_HYPER = ("lr", "betas", "eps", "weight_decay", "initial_lr")
LION_HYPER = ("lr", "betas", "weight_decay", "initial_lr")


def _ds_version() -> str:
    try:
        from deepspeed.git_version_info import version

        return version
    except Exception:
        return "0.19.8"


def _tag_dir(ds_dir: str, tag: str | None) -> tuple[str, str]:
    ds_dir = os.fspath(ds_dir).rstrip("/")
    if tag is None:
        if os.path.exists(os.path.join(ds_dir, MODEL_FILE)):
            return ds_dir, os.path.basename(ds_dir)
        latest = os.path.join(ds_dir, "latest")
        if not os.path.exists(latest):
            raise CheckpointError(f"{ds_dir} has no 'latest' file and no {MODEL_FILE}; pass --tag")
        with open(latest) as f:
            tag = f.read().strip()
    d = os.path.join(ds_dir, tag)
    if not os.path.exists(os.path.join(d, MODEL_FILE)):
        files = sorted(glob.glob(os.path.join(d, "*model_states.pt")))
        if files:
            raise CheckpointError(f"{d} holds {[os.path.basename(f) for f in files]}: model/pipeline parallel "
                                  "DeepSpeed checkpoints are not supported, only data parallel ZeRO-1/2")
        raise CheckpointError(f"{d} is not a DeepSpeed checkpoint: {MODEL_FILE} is missing")
    return d, tag


def _load(path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise CorruptCheckpointError(f"DeepSpeed checkpoint file {path} is unreadable: {e}") from e


def _layout(numels, paddings, world):
    """(offsets, padded group numel T, partition size P) of one group for ``world`` ranks."""
    offsets, cur = [], 0
    for n, pad in zip(numels, paddings):
        offsets.append(cur)
        cur += n + pad
    align = NCCL_START_ALIGNMENT * world
    flat = ((cur + align - 1) // align) * align if cur else 0
    return offsets, cur, flat // world


def _gather(parts, P, lo, hi):
    """Elements [lo, hi) of the concatenation of per-rank vectors, rank r starting at r*P."""
    out = []
    r = lo // P if P else 0
    while lo < hi:
        base = r * P
        take = min(hi, base + P) - lo
        src = parts[r]
        if lo - base + take > src.numel():
            raise CorruptCheckpointError(f"a DeepSpeed partition of rank {r} is shorter than its layout needs")
        out.append(src[lo - base: lo - base + take])
        lo += take
        r += 1
    return torch.cat(out) if len(out) != 1 else out[0].clone()


# ---------------------------------------------------------------- DeepSpeed -> shardopt
def from_deepspeed(ds_dir: str, path: str, *, tag: str | None = None, algorithm: str | None = None,
                   progress: bool = False) -> str:
    """Convert a DeepSpeed ZeRO-1/2 checkpoint (optimizer: shardopt, or DeepSpeed's Adam/AdamW/Lion) to ``path``."""
    d, tag = _tag_dir(ds_dir, tag)
    ms = _load(os.path.join(d, MODEL_FILE))
    W = int(ms["dp_world_size"])
    if ms.get("mp_world_size", 1) != 1:
        raise CheckpointError(f"{d}: model-parallel DeepSpeed checkpoints (mp_world_size {ms['mp_world_size']}) "
                              "are not supported")
    shapes = ms.get("param_shapes")
    if not shapes:
        raise CheckpointError(f"{d}/{MODEL_FILE} has no param_shapes: it is not a ZeRO-1/2 checkpoint "
                              "(stage 0 DeepSpeed checkpoints hold the optimizer state dict itself)")
    osds = []
    for r in range(W):
        cands = [os.path.join(d, f"{p}zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for p in ("", "bf16_")]
        f = next((c for c in cands if os.path.exists(c)), None)
        if f is None:
            raise CheckpointError(f"{d}: the optimizer file of rank {r} of {W} is missing ({os.path.basename(cands[0])})")
        sd = _load(f)["optimizer_state_dict"]
        stage = int(sd.get("zero_stage", 1))
        if stage not in (1, 2):
            raise CheckpointError(f"{f}: ZeRO stage {stage} checkpoints are not supported (only 1 and 2)")
        osds.append(sd)
    ds_cfg = ms.get("ds_config") or {}
    opt_cfg = (ds_cfg.get("optimizer") or {}) if isinstance(ds_cfg, dict) else {}
    if str(opt_cfg.get("type", "")).lower() == "adam" and not (opt_cfg.get("params") or {}).get("adam_w_mode", True):
        warnings.warn("shardopt: this DeepSpeed run used Adam with L2 regularization (adam_w_mode=false); "
                      "shardopt AdamW decouples weight decay, so continuing with weight_decay>0 changes the math",
                      RuntimeWarning, stacklevel=2)
    module = ms["module"]
    aliases = dict(ms.get("shared_params") or {})
    G = len(shapes)
    params, groups, sources = {}, [], {}
    for g in range(G):
        names = list(shapes[g].keys())
        numels = [math.prod(shapes[g][n]) for n in names]
        pads = list((osds[0].get("param_alignment_paddings") or [[0] * len(names)] * G)[g])
        offsets, T, _ = _layout(numels, pads, W)
        base0 = osds[0]["base_optimizer_state"]
        rigid = isinstance(base0, dict)

        def group_state(sd, g=g, rigid=rigid):
            b = sd["base_optimizer_state"]
            if rigid:
                pid = b["param_groups"][g]["params"][0]
                return b["state"].get(pid, {})
            return b[g]

        states = [group_state(sd) for sd in osds]
        fp32 = [sd["single_partition_of_fp32_groups"][g] for sd in osds]
        P = fp32[0].numel() + int(osds[0]["group_paddings"][g])
        if P * W < T:
            raise CorruptCheckpointError(f"{d}: group {g}'s partitions ({W} x {P}) are smaller than its parameters ({T})")
        hyper = dict(base0["param_groups"][g]) if rigid else {}
        hyper.pop("params", None)
        hyper.pop("shardopt_format", None)  # a state_dict marker, not a hyperparameter
        st_keys = [k for k, v in states[0].items() if k != "step" and torch.is_tensor(v) and v.dim() == 1]
        algo = algorithm or hyper.get("algorithm")
        keymap = {k: k for k in st_keys}
        if algo is None:
            ks = set(st_keys)
            if ks == {"exp_avg", "exp_avg_sq"}:
                algo = "adamw"
            elif ks == {"exp_avg"}:
                algo, keymap = "lion", dict(LION_KEYS)
            elif ks == {"momentum_buffer"}:
                algo = "lion"
            else:
                raise CheckpointError(f"{d}: cannot tell the optimizer of group {g} from its state keys "
                                      f"{sorted(ks)}; pass --algorithm")
        elif algo == "lion" and set(st_keys) == {"exp_avg"}:
            keymap = dict(LION_KEYS)
        if "algorithm" not in hyper:
            keep = ADAM_HYPER if algo == "adamw" else LION_HYPER
            hyper = {k: hyper[k] for k in keep if k in hyper}
            for k, v in ALGORITHMS[algo].defaults.items():  # e.g. maximize, which DeepSpeed's optimizers lack
                hyper.setdefault(k, v)
            if "betas" in hyper:
                hyper["betas"] = tuple(hyper["betas"])
        hyper["algorithm"] = algo
        step = states[0].get("step")
        if step is None and rigid:
            step = base0["param_groups"][g].get("step")
        if step is None:
            step = osds[0].get("base_optimizer_state_step", 0)
        step = float(step)
        for n, numel, off in zip(names, numels, offsets):
            if n not in module:
                raise CheckpointError(f"{d}/{MODEL_FILE}: parameter '{n}' is in param_shapes but not in the module")
            wdt = module[n].dtype
            keys = []
            for k in st_keys:
                sk = keymap[k]
                keys.append(sk)
                sources[optim_key(n, sk)] = (n, sk, tuple(shapes[g][n]), torch.float32,
                                             lambda off=off, numel=numel, parts=[s[k] for s in states], P=P:
                                             _gather(parts, P, off, off + numel).float())
            if wdt in LOW_PRECISION:
                keys.append("master_param")
                sources[optim_key(n, "master_param")] = (n, "master_param", tuple(shapes[g][n]), torch.float32,
                                                         lambda off=off, numel=numel, fp32=fp32, P=P:
                                                         _gather(fp32, P, off, off + numel).float())
            params[n] = {"shape": list(shapes[g][n]), "dtype": dtype_str(wdt), "algorithm": algo, "group": g,
                         "state": keys, "step": step}
        groups.append({"hyper": {k: encode_value(v) for k, v in hyper.items()}, "params": names})
    model = {}
    buffers = set(ms.get("buffer_names") or [])
    for n, t in module.items():
        if n in aliases:
            continue
        model[n] = {"shape": list(t.shape), "dtype": dtype_str(t.dtype), "kind": "buffer" if n in buffers else "param"}
        sources[model_key(n)] = (n, "model", tuple(t.shape), t.dtype, lambda t=t: t)
    extra = {"step": ms.get("global_steps"), "lr_scheduler": ms.get("lr_scheduler"),
             "deepspeed": {k: ms.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "ds_version")}}
    stage = int(osds[0].get("zero_stage", 1))
    return write_checkpoint(path, params=params, param_groups=groups, model=model, aliases=aliases, sources=sources,
                            world_size=W, layout=f"deepspeed-zero{stage}",
                            optimizer=str(opt_cfg.get("type") or "DeepSpeed client optimizer"),
                            extra=extra, progress=progress)


# ---------------------------------------------------------------- shardopt -> DeepSpeed
def to_deepspeed(path: str, ds_dir: str, *, world_size: int, tag: str | None = None, zero_stage: int = 1,
                 parameter_alignment: bool = False, state_format: str = "shardopt", progress: bool = False) -> str:
    """Write checkpoint ``path`` as a DeepSpeed ZeRO-1/2 checkpoint for ``world_size`` ranks.

    ``engine.load_checkpoint(ds_dir)`` then loads it at that world size, for
    an engine whose (client) optimizer has the same param groups in the same
    order. ``state_format="shardopt"`` (default) writes the state of a
    shardopt optimizer (``momentum_buffer`` / ``exp_avg``...); ``"deepspeed"``
    names it as DeepSpeed's own Adam and Lion do (Lion: ``exp_avg``).
    """
    if zero_stage not in (1, 2):
        raise ValueError("zero_stage must be 1 or 2")
    if state_format not in ("shardopt", "deepspeed"):
        raise ValueError("state_format must be 'shardopt' or 'deepspeed'")
    M = int(world_size)
    if M < 1:
        raise ValueError("world_size must be >= 1")
    n, errors = verify(path, progress=progress)
    if errors:
        raise CorruptCheckpointError(errors[0])
    directory = S.resolve(path)
    m = read_manifest(directory)
    md = S.read_metadata(directory)
    reader = S.TensorReader(directory, md)
    params, tensors = m["params"], m["tensors"]
    for fqn, p in params.items():
        if p["algorithm"] == "muon":
            raise CheckpointError(
                f"{directory}: parameter '{fqn}' is trained by Muon, which cannot run inside DeepSpeed's flat ZeRO "
                "partitions. shardopt's DeepSpeed integration runs Muon at stage 0 with shardopt's own ZeRO-1; "
                "load this checkpoint there with shardopt.checkpoint.load(path, engine)"
            )
    extra = None
    if EXTRA in m.get("files", {}):
        extra = torch.load(os.path.join(directory, EXTRA), map_location="cpu", weights_only=False)
    step = max((p["step"] for p in params.values()), default=0.0)
    tag = tag or f"global_step{int(step)}"
    out_dir = os.path.join(os.fspath(ds_dir), tag)
    os.makedirs(out_dir, exist_ok=True)
    version = _ds_version()

    glayouts = []  # per group: names, numels, paddings, offsets, T, P, dtype
    for gi, g in enumerate(m["param_groups"]):
        names = list(g["params"])
        dts = {params[f]["dtype"] for f in names}
        if len(dts) > 1:
            raise CheckpointError(f"{directory}: param group {gi} mixes dtypes {sorted(dts)}; DeepSpeed needs one per group")
        dt = str_dtype(dts.pop()) if names else torch.float32
        numels = [math.prod(params[f]["shape"]) for f in names]
        elem = torch.empty((), dtype=dt).element_size()
        align = 16 // math.gcd(16, elem) if parameter_alignment else 1
        pads, cur = [], 0
        for k, nmel in enumerate(numels):
            cur += nmel
            pad = 0 if k == len(numels) - 1 else (-cur) % align
            pads.append(pad)
            cur += pad
        offsets, T, P = _layout(numels, pads, M)
        glayouts.append((names, numels, pads, offsets, T, P, dt))
    bf16 = any(lay[6] == torch.bfloat16 for lay in glayouts)

    def rename(k, algo):
        if state_format == "deepspeed" and algo == "lion" and k == "momentum_buffer":
            return "exp_avg"
        return k

    bar = _bar(M + 1, "write DeepSpeed files", progress, "file")
    for r in range(M):
        state, pgroups, fp32, gpads, fills = {}, [], [], [], []
        for gi, (names, numels, _pads, offsets, T, P, _dt) in enumerate(glayouts):
            hyper = decode_group(m["param_groups"][gi]["hyper"])
            hyper = {k: v for k, v in hyper.items() if type(v).__name__ != "_Unrestorable"}
            algo = hyper.get("algorithm") or (params[names[0]]["algorithm"] if names else "adamw")
            if state_format == "deepspeed":
                hyper.pop("algorithm", None)
            gstep = params[names[0]]["step"] if names else 0.0
            lo_r, hi_r = r * P, (r + 1) * P
            pad_r = P if T <= lo_r else (hi_r - T if T < hi_r else 0)
            gpads.append(pad_r)
            keys = [k for k in params[names[0]]["state"] if k != "master_param"] if names else []
            st = {"step": _fake((), torch.float32)}
            fills.append((("optimizer_state_dict", "base_optimizer_state", "state", gi, "step"), None, gstep))
            for k in keys:
                st[rename(k, algo)] = _fake((P,), torch.float32)
            state[gi] = st
            pgroups.append({**hyper, **({"step": int(gstep)} if state_format == "deepspeed" else {}), "params": [gi]})
            fp32.append(_fake((P - pad_r,), torch.float32))
            for fqn, nmel, off in zip(names, numels, offsets):
                lo, hi = max(off, lo_r), min(off + nmel, lo_r + P - pad_r)
                if lo >= hi:
                    continue
                for k in keys:
                    fills.append((("optimizer_state_dict", "base_optimizer_state", "state", gi, rename(k, algo)),
                                  (optim_key(fqn, k), lo - off, lo - lo_r, hi - lo), None))
                mkey = optim_key(fqn, "master_param")
                src = mkey if mkey in tensors else model_key(fqn)
                fills.append((("optimizer_state_dict", "single_partition_of_fp32_groups", gi),
                              (src, lo - off, lo - lo_r, hi - lo), None))
        osd = {
            "base_optimizer_state": {"state": state, "param_groups": pgroups},
            "single_partition_of_fp32_groups": fp32,
            "zero_stage": zero_stage,
            "group_paddings": gpads,
            "param_alignment_paddings": [lay[2] for lay in glayouts],
            "partition_count": [M] * len(glayouts),
            "ds_version": version,
        }
        skeleton = {"optimizer_state_dict": osd, "ds_config": {}, "ds_version": version}
        name = f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        save_streaming(skeleton, os.path.join(out_dir, name), _filler(fills, reader, directory, m, md))
        bar.update()

    module, fills = OrderedDict(), []
    for fqn, info in m.get("model", {}).items():
        module[fqn] = _fake(info["shape"], str_dtype(info["dtype"]))
        fills.append((("module", fqn), (model_key(fqn), None, None, None), None))
    aliases = m.get("aliases", {})
    ms = {
        "module": module,
        "buffer_names": [f for f, i in m.get("model", {}).items() if i.get("kind") == "buffer"],
        "optimizer": None,
        "param_shapes": [OrderedDict((f, torch.Size(params[f]["shape"])) for f in lay[0]) for lay in glayouts],
        "frozen_param_shapes": None,
        "shared_params": dict(aliases),
        "frozen_param_fragments": None,
        "lr_scheduler": extra.get("lr_scheduler") if isinstance(extra, dict) else None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": int(step),
        "global_samples": int(step),
        "dp_world_size": M,
        "mp_world_size": 1,
        "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_config": {},
        "ds_version": version,
    }

    # tied weights: DeepSpeed's module state dict names every alias; point them at the same tensor
    for alias, target in aliases.items():
        if target in module:
            module[alias] = module[target]
    save_streaming(ms, os.path.join(out_dir, MODEL_FILE), _filler(fills, reader, directory, m, md))
    bar.update()
    bar.close()
    with open(os.path.join(os.fspath(ds_dir), "latest"), "w") as f:
        f.write(tag)
    return out_dir


def _filler(fills, reader, directory, m, md):
    checked = set()

    def fill(loaded):
        for where, src, value in fills:
            dest = loaded
            for w in where:
                dest = dest[w]
            if src is None:
                dest.fill_(value)
                continue
            key, off, dst_off, n = src
            t = m["tensors"][key]
            if off is None:
                _read_checked(reader, directory, m, md, key, dest)
                continue
            if key not in checked:
                errs = S.verify_chunks(directory, m, md, reader.chunks.get(key, []))
                if errs:
                    raise CorruptCheckpointError(errs[0])
                checked.add(key)
            if t.get("storage") == "flat":
                reader.read_into(key, dest[dst_off:dst_off + n], offset=off)
                scale = legacy_scale(m, key)
                if scale is not None:
                    dest[dst_off:dst_off + n].mul_(scale)
            else:  # model weight stored in its own shape: read it whole (one tensor), take the range
                full = torch.empty(t["shape"], dtype=str_dtype(t["dtype"]))
                reader.read_into(key, full)
                dest[dst_off:dst_off + n].copy_(full.reshape(-1)[off:off + n].float())
    return fill

