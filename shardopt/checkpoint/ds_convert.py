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
parameter at a time is materialized. int8 state (``state_dtype="int8"``:
codes plus ``<key>_scale``, one scale per 256 elements counted from each
partition's start) is dequantized slice by slice, so the converted checkpoint
holds fp32 state per parameter. Writing: for a new world size M the same
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

from ..kernels import state_precision
from ..optim.base import ALGORITHMS
from ..sharding.plan import contiguous_pieces, per_item_pieces

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
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
NCCL_START_ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor (stage 1/2)
LION_KEYS = {"exp_avg": "momentum_buffer"}  # DeepSpeed Lion -> shardopt
ADAM_HYPER = ("lr", "betas", "eps", "weight_decay", "initial_lr")
LION_HYPER = ("lr", "betas", "weight_decay", "initial_lr")
MUON_HYPER = ("lr", "momentum", "weight_decay", "initial_lr")


def _ds_version() -> str:
    try:
        from deepspeed.git_version_info import version

        return version
    except Exception:
        return "0.19.8"


def _open_verified(path, progress):
    """A shardopt checkpoint to write out: verified first, then its manifest, tensor metadata, reader and the
    extra (non-tensor) payload, None when it has none."""
    _, errors = verify(path, progress=progress)
    if errors:
        raise CorruptCheckpointError(errors[0])
    directory = S.resolve(path)
    m = read_manifest(directory)
    md = S.read_metadata(directory)
    extra = None
    if EXTRA in m.get("files", {}):
        extra = torch.load(os.path.join(directory, EXTRA), map_location="cpu", weights_only=False)
    return directory, m, md, S.TensorReader(directory, md), extra


def _tag_dir(ds_dir: str, tag: str | None) -> tuple[str, str]:
    ds_dir = os.fspath(ds_dir).rstrip("/")
    if tag is None:
        if _model_file(ds_dir) is not None:
            return ds_dir, os.path.basename(ds_dir)
        latest = os.path.join(ds_dir, "latest")
        if not os.path.exists(latest):
            raise CheckpointError(f"{ds_dir} has no 'latest' file and no {MODEL_FILE}; pass --tag")
        with open(latest) as f:
            tag = f.read().strip()
    d = os.path.join(ds_dir, tag)
    if _model_file(d) is None:
        files = sorted(glob.glob(os.path.join(d, "*model_states.pt")))
        if files:
            raise CheckpointError(f"{d} holds {[os.path.basename(f) for f in files]}: model/pipeline parallel "
                                  "DeepSpeed checkpoints are not supported, only data parallel ZeRO-1/2/3")
        raise CheckpointError(f"{d} is not a DeepSpeed checkpoint: {MODEL_FILE} is missing")
    return d, tag


def _model_file(d: str) -> str | None:
    """``mp_rank_00_model_states.pt`` (stage 0-2) or rank 0's ``zero_pp_rank_0_...`` (ZeRO-3)."""
    for name in (MODEL_FILE, ZERO3_MODEL_FILE.format(rank=0)):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


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


def _assemble(pieces, parts, item, numel, what):
    """Parameter ``item``'s full flat tensor from every rank's flat partition (``pieces`` from sharding.plan)."""
    out = torch.empty(numel, dtype=torch.float32)
    got = 0
    for r, pcs in enumerate(pieces):
        for pc in pcs:
            if pc.item != item:
                continue
            src = parts[r]
            if pc.offset + pc.numel > src.numel():
                raise CorruptCheckpointError(f"{what}: the partition of rank {r} is shorter than its layout needs "
                                             f"({src.numel()} elements, {pc.offset + pc.numel} needed)")
            out[pc.lo:pc.hi] = src[pc.offset:pc.offset + pc.numel].float()
            got += pc.numel
    if got != numel:
        raise CorruptCheckpointError(f"{what}: the rank partitions hold {got} of its {numel} elements")
    return out


def _algorithm_of(hyper: dict, st_keys, algorithm, where, ds_type=""):
    """(algorithm, DeepSpeed key -> shardopt key) of one group: ours name it, DeepSpeed's Muon tags use_muon,
    DeepSpeed's Lion is named in the config (its CPU Lion also allocates an unused exp_avg_sq)."""
    keymap = {k: k for k in st_keys}
    ks = set(st_keys)
    algo = algorithm or hyper.get("algorithm")
    if algo is None and "use_muon" in hyper:
        algo = "muon" if hyper["use_muon"] else "adamw"
    if algo is None and ds_type == "lion" and "exp_avg" in ks:
        return "lion", dict(LION_KEYS)
    if algo is None:
        if ks == {"exp_avg", "exp_avg_sq"}:
            algo = "adamw"
        elif ks == {"exp_avg"}:
            algo = "lion"
        elif ks == {"momentum_buffer"}:
            algo = "lion"
        else:
            raise CheckpointError(f"{where}: cannot tell the optimizer of this group from its state keys "
                                  f"{sorted(ks)}; pass --algorithm")
    if algo == "lion" and ks == {"exp_avg"}:
        keymap = dict(LION_KEYS)
    return algo, keymap


def _hyper(raw: dict, algo: str) -> dict:
    hyper = dict(raw)
    for k in ("params", "shardopt_format", "use_muon", "name", "ns_method", "bias_correction", "step"):
        hyper.pop(k, None)  # state_dict markers and DeepSpeed bookkeeping, not hyperparameters of ours
    if "algorithm" not in raw:
        keep = {"adamw": ADAM_HYPER, "lion": LION_HYPER, "muon": MUON_HYPER}[algo]
        hyper = {k: hyper[k] for k in keep if k in hyper}
        for k, v in ALGORITHMS[algo].defaults.items():  # e.g. maximize, which DeepSpeed's optimizers lack
            hyper.setdefault(k, v)
        hyper.setdefault("state_dtype", "fp32")  # DeepSpeed's own optimizers keep fp32 state
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
    hyper["algorithm"] = algo
    return hyper


def _as_step(v) -> float | None:
    if v is None:
        return None
    return float(v.item() if torch.is_tensor(v) else v)


# ---------------------------------------------------------------- DeepSpeed -> shardopt
def from_deepspeed(ds_dir: str, path: str, *, tag: str | None = None, algorithm: str | None = None,
                   progress: bool = False) -> str:
    """Convert a DeepSpeed ZeRO-1/2/3 checkpoint to ``path``.

    Its optimizer can be shardopt's (the client optimizer, or ``shardopt.deepspeed``), or DeepSpeed's own
    Adam/AdamW, Lion or Muon.
    """
    d, tag = _tag_dir(ds_dir, tag)
    ms = _load(_model_file(d))
    if ms.get("mp_world_size", 1) != 1:
        raise CheckpointError(f"{d}: model-parallel DeepSpeed checkpoints (mp_world_size {ms['mp_world_size']}) "
                              "are not supported")
    W = int(ms["dp_world_size"])
    shapes = ms.get("param_shapes")
    if not shapes:
        raise CheckpointError(f"{d}/{MODEL_FILE} has no param_shapes: it is not a ZeRO-1/2/3 checkpoint "
                              "(stage 0 DeepSpeed checkpoints hold the optimizer state dict itself)")
    osds = []
    for r in range(W):
        cands = [os.path.join(d, f"{p}zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for p in ("", "bf16_")]
        f = next((c for c in cands if os.path.exists(c)), None)
        if f is None:
            raise CheckpointError(f"{d}: the optimizer file of rank {r} of {W} is missing ({os.path.basename(cands[0])})")
        sd = _load(f)["optimizer_state_dict"]
        stage = int(sd.get("zero_stage", 1))
        if stage not in (1, 2, 3):
            raise CheckpointError(f"{f}: ZeRO stage {stage} checkpoints are not supported (only 1, 2 and 3)")
        osds.append(sd)
    stage = int(osds[0].get("zero_stage", 1))
    ds_cfg = ms.get("ds_config") or {}
    opt_cfg = (ds_cfg.get("optimizer") or {}) if isinstance(ds_cfg, dict) else {}
    if str(opt_cfg.get("type", "")).lower() == "adam" and not (opt_cfg.get("params") or {}).get("adam_w_mode", True):
        warnings.warn("shardopt: this DeepSpeed run used Adam with L2 regularization (adam_w_mode=false); "
                      "shardopt AdamW decouples weight decay, so continuing with weight_decay>0 changes the math",
                      RuntimeWarning, stacklevel=2)
    aliases = dict(ms.get("shared_params") or {})
    module = ms["module"]
    flats = _flat_groups(d, osds, shapes, stage, W, ds_cfg)
    params, groups, sources, fp32_of = {}, [], {}, {}
    for g, fg in enumerate(flats):
        where = f"{d}: param group {g}"
        states, hyper_raw = fg["states"], fg["hyper"]
        st_keys = [k for k, v in states[0].items() if k != "step" and torch.is_tensor(v) and v.dim() == 1]
        states, st_keys = _dequantized(states, st_keys, where)  # int8 state: fp32 per parameter
        algo, keymap = _algorithm_of(hyper_raw, st_keys, algorithm, where, str(opt_cfg.get("type", "")).lower())
        st_keys = [k for k in st_keys if k in keymap]
        hyper = _hyper(hyper_raw, algo)
        step = _as_step(states[0].get("step"))
        if step is None:
            step = _as_step(hyper_raw.get("step")) or _as_step(fg.get("step"))
        if step is None:  # DeepSpeed's Muon keeps no step for its Muon groups
            step = _as_step(ms.get("global_steps")) or 0.0
        # DeepSpeed's own Muon at ZeRO-1/2 keeps the whole momentum of every matrix its partition touches
        whole_momentum = stage in (1, 2) and hyper_raw.get("use_muon") is True
        for j, (n, numel, shape) in enumerate(zip(fg["names"], fg["numels"], fg["shapes"])):
            if n not in module:
                raise CheckpointError(f"{d}: parameter '{n}' is in param_shapes but not in the module")
            wdt = module[n].dtype
            keys = []
            for k in st_keys:
                sk = keymap[k]
                keys.append(sk)
                if whole_momentum and k == "momentum_buffer":
                    make = _whole_momentum(fg, j, states, n)
                else:
                    make = (lambda j=j, numel=numel, parts=[s[k] for s in states], what=f"{n} state '{k}'",
                            pieces=fg["pieces"]: _assemble(pieces, parts, j, numel, what))
                sources[optim_key(n, sk)] = (n, sk, shape, torch.float32, make)
            fp32_make = (lambda j=j, numel=numel, what=f"{n} fp32 master", pieces=fg["pieces"], parts=fg["fp32"]:
                         _assemble(pieces, parts, j, numel, what))
            fp32_of[n] = (fp32_make, shape, wdt)
            if wdt in LOW_PRECISION:
                keys.append("master_param")
                sources[optim_key(n, "master_param")] = (n, "master_param", shape, torch.float32, fp32_make)
            params[n] = {"shape": list(shape), "dtype": dtype_str(wdt), "algorithm": algo, "group": g,
                         "state": keys, "step": step}
        groups.append({"hyper": {k: encode_value(v) for k, v in hyper.items()}, "params": list(fg["names"])})
    model = {}
    buffers = set(ms.get("buffer_names") or [])
    for n, t in module.items():
        if n in aliases:
            continue
        shape = tuple(t.shape)
        make = lambda t=t: t  # noqa: E731
        if stage == 3 and n in fp32_of:  # ZeRO-3 saves partitioned (empty) weights: the fp32 partitions hold them
            fmake, shape, wdt = fp32_of[n]
            make = lambda fmake=fmake, shape=shape, wdt=wdt: fmake().reshape(shape).to(wdt)  # noqa: E731
        model[n] = {"shape": list(shape), "dtype": dtype_str(t.dtype), "kind": "buffer" if n in buffers else "param"}
        sources[model_key(n)] = (n, "model", shape, t.dtype, make)
    extra = {"step": ms.get("global_steps"), "lr_scheduler": ms.get("lr_scheduler"),
             "deepspeed": {k: ms.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "ds_version")}}
    return write_checkpoint(path, params=params, param_groups=groups, model=model, aliases=aliases, sources=sources,
                            world_size=W, layout=f"deepspeed-zero{stage}",
                            optimizer=str(opt_cfg.get("type") or "DeepSpeed client optimizer"),
                            extra=extra, progress=progress)


def _flat_groups(d, osds, shapes, stage, W, ds_cfg) -> list[dict]:
    """Per optimizer param group: names, shapes, numels, per-rank pieces, states and fp32 partitions."""
    out = []
    if stage in (1, 2):
        base0 = osds[0]["base_optimizer_state"]
        rigid = isinstance(base0, dict)
        for g, group_shapes in enumerate(shapes):
            names = list(group_shapes.keys())
            numels = [math.prod(group_shapes[n]) for n in names]
            pads = list((osds[0].get("param_alignment_paddings") or [[0] * len(names)] * len(shapes))[g])
            offsets, T, _ = _layout(numels, pads, W)
            fp32 = [sd["single_partition_of_fp32_groups"][g] for sd in osds]
            P = fp32[0].numel() + int(osds[0]["group_paddings"][g])
            if P * W < T:
                raise CorruptCheckpointError(f"{d}: group {g}'s partitions ({W} x {P}) are smaller than its "
                                             f"parameters ({T})")

            def group_state(sd, g=g):
                b = sd["base_optimizer_state"]
                if rigid:
                    pid = b["param_groups"][g]["params"][0]
                    return b["state"].get(pid, {})
                return b[g]

            out.append({"names": names, "numels": numels, "shapes": [tuple(group_shapes[n]) for n in names],
                        "pieces": contiguous_pieces(numels, offsets, P, W), "fp32": fp32,
                        "states": [group_state(sd) for sd in osds],
                        "hyper": dict(base0["param_groups"][g]) if rigid else {},
                        "step": osds[0].get("base_optimizer_state_step")})
        return out
    # ZeRO-3: every parameter is cut into W equal ranges; a group may hold several sub-group flats
    inner = [sd["optimizer_state_dict"] for sd in osds]
    fp32_all = [sd["fp32_flat_groups"] for sd in osds]
    for g, group_shapes in enumerate(shapes):
        names = list(group_shapes.keys())
        numels = [math.prod(group_shapes[n]) for n in names]
        flat_ids = list(inner[0]["param_groups"][g]["params"])
        k = 0
        for fid in flat_ids:
            size = fp32_all[0][fid].numel()
            start, acc = k, 0
            while k < len(names) and acc < size:
                acc += -(-numels[k] // W)
                k += 1
            if acc != size:
                raise CorruptCheckpointError(f"{d}: ZeRO-3 sub-group {fid} holds {size} elements per rank, but its "
                                             f"parameters from {names[start]} need {acc}")
            sub = slice(start, k)
            out.append({"names": names[sub], "numels": numels[sub],
                        "shapes": [tuple(group_shapes[n]) for n in names[sub]],
                        "pieces": per_item_pieces(numels[sub], W), "fp32": [f[fid] for f in fp32_all],
                        "states": [inn["state"].get(fid, {}) for inn in inner],
                        "hyper": dict(inner[0]["param_groups"][g]), "group": g})
        if k != len(names):
            raise CorruptCheckpointError(f"{d}: ZeRO-3 param group {g}'s flat partitions hold {k} of its "
                                         f"{len(names)} parameters")
    return _merge_subgroups(out)


def _merge_subgroups(subs: list[dict]) -> list[dict]:
    """ZeRO-3 sub-groups of one param group become one group of the shardopt checkpoint."""
    if all("group" not in s for s in subs):
        return subs
    merged: dict = {}
    for s in subs:
        merged.setdefault(s["group"], []).append(s)
    out = []
    for g in sorted(merged):
        parts = merged[g]
        if len(parts) == 1:
            out.append(parts[0])
            continue
        raise CheckpointError(f"a ZeRO-3 param group split into {len(parts)} sub-groups (sub_group_size) is not "
                              "supported by the converter yet; save with a larger zero_optimization.sub_group_size")
    return out


class _Int8Partition:
    """One rank's int8 state partition (codes, and one fp32 scale per block of 256 counted from the partition's
    first element), read as fp32 one slice at a time, as the memory-mapped fp32 partitions are."""

    def __init__(self, codes, scale, kind):
        self.codes, self.scale, self.kind = codes.reshape(-1), scale.reshape(-1), kind

    def numel(self) -> int:
        return self.codes.numel()

    def __getitem__(self, sl: slice) -> torch.Tensor:
        a, b, stride = sl.indices(self.numel())
        if stride != 1 or b <= a:
            return state_precision.dequantize(self.codes, self.scale, self.kind)[sl]
        lo = a - a % state_precision.BLOCK
        hi = min(self.numel(), b + (-b) % state_precision.BLOCK)
        first = lo // state_precision.BLOCK
        vals = state_precision.dequantize(self.codes[lo:hi],
                                          self.scale[first:first + state_precision.n_blocks(hi - lo)], self.kind)
        return vals[a - lo:b - lo]


def _dequantized(states: list, keys: list, where: str) -> tuple[list, list]:
    """(states, keys) with int8 state (``<key>`` codes + ``<key>_scale``, a shardopt optimizer with
    ``state_dtype="int8"`` on DeepSpeed's partitions) read as fp32 values and the scale keys dropped: the
    converted checkpoint holds fp32 state per parameter."""
    suffix = state_precision.SCALE_SUFFIX
    q8 = [k for k in keys if k + suffix in keys and
          states[0][k].dtype == state_precision.code_dtype(state_precision.int8_kind(k))]
    if not q8:
        return states, keys
    out = []
    for r, st in enumerate(states):
        st = dict(st)
        for k in q8:
            codes, scale = st.get(k), st.get(k + suffix)
            if not (torch.is_tensor(codes) and torch.is_tensor(scale)):
                raise CorruptCheckpointError(f"{where}: rank {r}'s optimizer file lacks the int8 state '{k}' or "
                                             f"its '{k + suffix}', which rank 0's has")
            if scale.numel() != state_precision.n_blocks(codes.numel()):
                raise CorruptCheckpointError(f"{where}: the int8 state '{k}' of rank {r} has {scale.numel()} block "
                                             f"scales for {codes.numel()} codes (one per 256 expected)")
            st[k] = _Int8Partition(codes, scale, state_precision.int8_kind(k))
            st.pop(k + suffix)
        out.append(st)
    scale_keys = {k + suffix for k in q8}
    return out, [k for k in keys if k not in scale_keys]


def _whole_momentum(fg, j, states, name):
    """DeepSpeed Muon, ZeRO-1/2: each rank's buffer is the whole momentum of the matrices its partition touches,
    in group order; every such rank holds the same copy, so read the first."""
    def make():
        for r, pcs in enumerate(fg["pieces"]):
            held = sorted({pc.item for pc in pcs})
            if j in held:
                off = sum(fg["numels"][i] for i in held if i < j)
                buf = states[r]["momentum_buffer"]
                n = fg["numels"][j]
                if off + n > buf.numel():
                    raise CorruptCheckpointError(f"{name}: DeepSpeed Muon's momentum buffer of rank {r} is shorter "
                                                 "than the matrices its partition holds")
                return buf[off:off + n].float().clone()
        raise CorruptCheckpointError(f"{name}: no rank's partition holds it")
    return make


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
    directory, m, md, reader, extra = _open_verified(path, progress)
    params, tensors = m["params"], m["tensors"]
    for fqn, p in params.items():
        if p["algorithm"] == "muon" and state_format == "deepspeed":
            raise CheckpointError(
                f"{directory}: parameter '{fqn}' is trained by Muon; DeepSpeed's own Muon keeps whole matrices' "
                "momentum per partition at ZeRO-1/2, which this writer does not produce. Write it for "
                "\"type\": \"shardopt.Muon\" (state_format='shardopt'), or as a universal checkpoint"
            )
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

    shapes = [[f for f in lay[0]] for lay in glayouts]
    _write_model_states(m, reader, directory, md, os.path.join(out_dir, MODEL_FILE), shapes, M, step, extra, version)
    bar.update()
    bar.close()
    with open(os.path.join(os.fspath(ds_dir), "latest"), "w") as f:
        f.write(tag)
    return out_dir


def _write_model_states(m, reader, directory, md, out, group_fqns, world, step, extra, version) -> None:
    """DeepSpeed's ``*model_states.pt``: the module's weights and the bookkeeping the engine reads."""
    params = m["params"]
    module, fills = OrderedDict(), []
    for fqn, info in m.get("model", {}).items():
        module[fqn] = _fake(info["shape"], str_dtype(info["dtype"]))
        fills.append((("module", fqn), (model_key(fqn), None, None, None), None))
    aliases = m.get("aliases", {})
    ms = {
        "module": module,
        "buffer_names": [f for f, i in m.get("model", {}).items() if i.get("kind") == "buffer"],
        "optimizer": None,
        "param_shapes": [OrderedDict((f, torch.Size(params[f]["shape"])) for f in fqns) for fqns in group_fqns],
        "frozen_param_shapes": None,
        "shared_params": dict(aliases),
        "frozen_param_fragments": None,
        "lr_scheduler": extra.get("lr_scheduler") if isinstance(extra, dict) else None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": int(step),
        "global_samples": int(step),
        "dp_world_size": world,
        "mp_world_size": 1,
        "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_config": {},
        "ds_version": version,
    }
    # tied weights: DeepSpeed's module state dict names every alias; point them at the same tensor
    for alias, target in aliases.items():
        if target in module:
            module[alias] = module[target]
    save_streaming(ms, out, _filler(fills, reader, directory, m, md))


# ---------------------------------------------------------------- shardopt -> DeepSpeed universal
UNIVERSAL_PARAM = "param"  # deepspeed.checkpoint.constants.PARAM


def to_deepspeed_universal(path: str, ds_dir: str, *, tag: str | None = None, state_format: str = "shardopt",
                           progress: bool = False) -> str:
    """Write checkpoint ``path`` as a DeepSpeed universal checkpoint, which loads at any world size and stage.

    ``engine.load_checkpoint(ds_dir)`` with ``"checkpoint": {"load_universal": true}`` in the config reads it.
    Every parameter gets ``zero/<fqn>/fp32.pt``, one file per state tensor (``momentum_buffer`` for Lion and
    Muon, ``exp_avg``/``exp_avg_sq`` for AdamW; ``state_format="deepspeed"`` names Lion's ``exp_avg`` as
    DeepSpeed's own Lion does) and ``step.pt``; ``zero/optimizer_state.pt`` holds the param groups, and the
    model-states files the weights. The engine's optimizer must have the same param groups in the same order.
    """
    if state_format not in ("shardopt", "deepspeed"):
        raise ValueError("state_format must be 'shardopt' or 'deepspeed'")
    directory, m, md, reader, extra = _open_verified(path, progress)
    params, tensors = m["params"], m["tensors"]
    step = max((p["step"] for p in params.values()), default=0.0)
    tag = tag or f"global_step{int(step)}"
    out_dir = os.path.join(os.fspath(ds_dir), tag)
    zero_dir = os.path.join(out_dir, "zero")
    os.makedirs(zero_dir, exist_ok=True)
    version = _ds_version()

    def read(key, shape):
        t = tensors[key]
        dest = torch.empty(t["shape"] if t.get("storage") != "flat" else (math.prod(t["shape"]),),
                           dtype=str_dtype(t["dtype"]))
        _read_checked(reader, directory, m, md, key, dest)
        return dest.reshape(shape)

    bar = _bar(len(params) + 2, "write universal files", progress, "param")
    for fqn, p in params.items():
        pdir = os.path.join(zero_dir, fqn)
        os.makedirs(pdir, exist_ok=True)
        shape = tuple(p["shape"])
        src = optim_key(fqn, "master_param")
        fp32 = read(src if src in tensors else model_key(fqn), shape).float()
        torch.save({UNIVERSAL_PARAM: fp32}, os.path.join(pdir, "fp32.pt"))
        for k in p["state"]:
            if k == "master_param":
                continue
            lion_ds = state_format == "deepspeed" and p["algorithm"] == "lion" and k == "momentum_buffer"
            name = "exp_avg" if lion_ds else k
            torch.save({UNIVERSAL_PARAM: read(optim_key(fqn, k), shape).float()}, os.path.join(pdir, f"{name}.pt"))
        torch.save(torch.tensor(float(p["step"])), os.path.join(pdir, "step.pt"))
        bar.update()
    groups = []
    for g in m["param_groups"]:
        hyper = {k: v for k, v in decode_group(g["hyper"]).items() if type(v).__name__ != "_Unrestorable"}
        if state_format == "deepspeed":
            hyper.pop("algorithm", None)
        groups.append(dict(hyper, params=list(range(len(groups), len(groups) + 1))))
    first = next(iter(params.values()), {"step": 0.0})
    # ZeRO-1/2 read "param_groups"; ZeRO-3 reads the same under "optimizer_state_dict" with a step in its state
    torch.save({"param_groups": groups, "ds_version": version,
                "optimizer_state_dict": {"state": {0: {"step": torch.tensor(float(first["step"]))}},
                                         "param_groups": groups}},
               os.path.join(zero_dir, "optimizer_state.pt"))
    fqns = [list(g["params"]) for g in m["param_groups"]]
    # one model-states file for each way the engine looks for it: ZeRO-1/2, and ZeRO-3 (rank 0's name)
    for name in (MODEL_FILE, ZERO3_MODEL_FILE.format(rank=0)):
        _write_model_states(m, reader, directory, md, os.path.join(out_dir, name), fqns, m.get("world_size", 1),
                            step, extra, version)
    bar.update(2)
    bar.close()
    with open(os.path.join(os.fspath(ds_dir), "latest_universal"), "w") as f:
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

