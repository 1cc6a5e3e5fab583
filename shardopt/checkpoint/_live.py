"""What a live model + optimizer hold, as stored tensors keyed by FQN.

:func:`collect` walks a model and a shardopt optimizer in any layout (single
device, ZeRO-1, FSDP2, or inside a DeepSpeed ZeRO-1/2 engine) and returns
:class:`Target` s: for every model tensor and every optimizer state tensor,
the DCP key, the logical shape and dtype, and this rank's piece(s) of it as
views of the live memory. Saving writes from those views; loading reads into
them, so the same description serves both directions. The one exception is
int8 state of a DeepSpeed partition, whose blocks do not line up with the
parameters: its targets view an fp32 copy, quantized back after a load
(:func:`_partition_values`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..kernels import state_precision
from ..optim import _steps
from ..optim.base import LOW_PRECISION, ShardedOptimizer
from ._manifest import dtype_str, encode_group, model_key, optim_key
from ._storage import FlatPieces, _is_dtensor

_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


@dataclass
class Target:
    key: str  # DCP key
    fqn: str
    slot: str  # "model" or the optimizer state key
    shape: tuple  # logical shape
    dtype: torch.dtype  # stored dtype
    value: object  # tensor, DTensor or FlatPieces (views of live memory)

    @property
    def storage_shape(self):
        return (math.prod(self.shape),) if isinstance(self.value, FlatPieces) else tuple(self.shape)


@dataclass
class ParamInfo:
    fqn: str
    shape: tuple
    dtype: torch.dtype
    algorithm: str
    group: int
    state_keys: list
    step_states: list  # the live state dicts whose "step" count to read / set


@dataclass
class Quantized:
    """An int8 state of a live parameter: codes ``st[key]`` and scales ``st[key + "_scale"]``."""

    fqn: str
    key: str
    layout: object
    index: int
    param: object
    st: dict


@dataclass
class Live:
    model_targets: list = field(default_factory=list)
    optim_targets: list = field(default_factory=list)
    params: dict = field(default_factory=dict)  # fqn -> ParamInfo (optimizer params, in order)
    groups: list = field(default_factory=list)  # (live group dict, [fqn])
    aliases: dict = field(default_factory=dict)  # tied-weight alias -> fqn
    buffers: set = field(default_factory=set)
    layout: str = "none"
    world_size: int = 1
    optimizer_class: str | None = None
    refresh_master: list = field(default_factory=list)  # callables(fqn_set) run after a load
    # callables run after a load, once the steps are set: int8 state read as fp32 is quantized back
    requantize: list = field(default_factory=list)
    ds_stage: int | None = None
    quantized: list = field(default_factory=list)  # Quantized: the int8 states

    def targets(self):
        return self.model_targets + self.optim_targets

    def manifest_params(self) -> dict:
        out = {}
        for fqn, pi in self.params.items():
            out[fqn] = {
                "shape": list(pi.shape), "dtype": dtype_str(pi.dtype), "algorithm": pi.algorithm, "group": pi.group,
                "state": list(pi.state_keys),
                "step": float(_steps.get(pi.step_states[0])) if pi.step_states else 0.0,
            }
        return out

    def manifest_groups(self) -> list:
        return [{"hyper": encode_group(g), "params": list(fqns)} for g, fqns in self.groups]


def clean_name(name: str) -> str:
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def unwrap(model):
    """(the user's module, the DeepSpeed engine or None), through DDP / DeepSpeed / torch.compile wrappers."""
    engine = None
    seen = 0
    while model is not None and seen < 8:
        seen += 1
        tname = type(model).__name__
        if tname in ("DeepSpeedEngine", "PipelineEngine", "DeepSpeedHybridEngine") and hasattr(model, "module"):
            engine = model
            model = model.module
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            break
    return model, engine


def model_tensors(module):
    """[(fqn, tensor, kind)] for parameters (tied ones once) and persistent buffers; and aliases."""
    out, aliases, seen = [], {}, {}
    for name, p in module.named_parameters(remove_duplicate=False):
        name = clean_name(name)
        if id(p) in seen:
            aliases[name] = seen[id(p)]
            continue
        seen[id(p)] = name
        out.append((name, p, "param"))
    for mname, mod in module.named_modules(remove_duplicate=False):
        for bname, b in mod._buffers.items():
            if b is None or bname in mod._non_persistent_buffers_set:
                continue
            name = clean_name(f"{mname}.{bname}" if mname else bname)
            if id(b) in seen:
                if name != seen[id(b)]:
                    aliases[name] = seen[id(b)]
                continue
            seen[id(b)] = name
            out.append((name, b, "buffer"))
    return out, aliases


# ---------------------------------------------------------------- pieces of a state tensor
def dtensor_pieces(global_shape, mesh, placements, local: torch.Tensor):
    """This rank's pieces of a DTensor in flat coordinates: ``[(flat start, 1-D view of local)]``.

    From the exact index runs of :func:`shardopt.sharding.mesh.dtensor_local_runs`, so a
    ``_StridedShard`` local shard (rows 0-1 and 4-5 of 8, say) gives one piece per run, not the
    single box that ``compute_local_shape_and_global_offset`` would suggest."""
    from ..sharding.mesh import dtensor_local_runs
    from ..sharding.plan import flat_runs, runs_len

    runs = dtensor_local_runs(global_shape, mesh, placements)
    if runs is None:
        return []
    sizes = tuple(runs_len(r) for r in runs)
    if math.prod(sizes) == 0:
        return []
    if tuple(local.shape) != sizes:
        raise ValueError(f"local shard shape {tuple(local.shape)} differs from its DTensor chunk {sizes}")
    flat = local.reshape(-1)
    if flat.data_ptr() != local.data_ptr() and local.numel() > 0:
        raise ValueError("a DTensor local shard is not contiguous; it cannot be loaded in place")
    pieces, pos = [], 0
    for start, n in flat_runs(tuple(global_shape), runs):
        pieces.append((start, flat[pos:pos + n]))
        pos += n
    return pieces


def state_pieces(layout, i: int, p, v: torch.Tensor, describe: str, scale: bool = False):
    """This rank's pieces of state tensor ``v`` of parameter ``p`` (index ``i``) in flat coordinates.

    ``scale``: ``v`` holds the block scales of an int8 state (one per 256 elements of the flattened
    parameter; every layout cuts such a parameter on block boundaries), in the coordinates of the
    ``state_precision.scale_shape(p.shape)`` tensor."""
    if scale:
        return _scale_pieces(layout, i, p, v, describe)
    numel = p.numel()
    if _is_dtensor(v):
        return dtensor_pieces(v.shape, v.device_mesh, v.placements, v._local_tensor)
    if _is_dtensor(p):
        return dtensor_pieces(p.shape, p.device_mesh, p.placements, v)
    if getattr(layout, "name", "") == "zero1":
        if layout.whole[i]:
            if layout.owner[i] == layout.rank:
                if v.numel() != numel:
                    raise ValueError(f"{describe}: owner rank holds {tuple(v.shape)}, expected the whole matrix")
                return [(0, v.reshape(-1))]
            return []
        r = layout.range[i]
        if r is None:
            return []
        if v.dim() != 1 or v.numel() != r[1] - r[0]:
            raise ValueError(f"{describe}: ZeRO-1 state {tuple(v.shape)} does not match owned range {r}")
        return [(r[0], v)]
    if tuple(v.shape) != tuple(p.shape):
        raise ValueError(f"{describe}: state shape {tuple(v.shape)} differs from the parameter's {tuple(p.shape)}")
    return [(0, v.reshape(-1))] if numel else []


def _scale_pieces(layout, i, p, v, describe):
    if _is_dtensor(v):
        return dtensor_pieces(v.shape, v.device_mesh, v.placements, v._local_tensor)
    b = layout.int8_block(i)
    full = math.prod(state_precision.scale_shape(p.shape, b))
    if getattr(layout, "name", "") == "zero1" and not layout.whole[i]:
        r = layout.range[i]
        if r is None:
            return []
        if r[0] % b or v.numel() != state_precision.n_blocks(r[1] - r[0], b):
            raise ValueError(f"{describe}: ZeRO-1 block scales {tuple(v.shape)} do not match owned range {r}")
        return [(r[0] // b, v.reshape(-1))]
    if v.numel() == 0:
        return []
    if v.numel() != full:
        raise ValueError(f"{describe}: {v.numel()} block scales, expected {full}")
    return [(0, v.reshape(-1))]


# ---------------------------------------------------------------- collect
def _is_ds_zero(opt) -> bool:
    return hasattr(opt, "round_robin_bit16_groups") and hasattr(opt, "single_partition_of_fp32_groups")


def _reshard_fsdp(module) -> None:
    """FSDP2 leaves the root unsharded after a forward without backward (an evaluation):
    its registered parameters are then full tensors, not the DTensors the optimizer holds."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def collect(model, optimizer, weights: bool = True) -> Live:
    """``weights=False``: the model only names the optimizer's parameters; none of its tensors is a target."""
    module, engine = unwrap(model)
    live = Live()
    if dist.is_available() and dist.is_initialized():
        live.world_size = dist.get_world_size()
    name_of = {}
    if module is not None:
        _reshard_fsdp(module)
        tensors, live.aliases = model_tensors(module)
        for fqn, t, kind in tensors:
            if hasattr(t, "ds_id"):
                raise NotImplementedError(
                    f"shardopt checkpoints do not support DeepSpeed ZeRO-3 partitioned parameters ({fqn}); "
                    "use ZeRO-1/2, or DeepSpeed's own checkpointing for ZeRO-3"
                )
            name_of[id(t)] = fqn
            if not weights:
                continue
            live.model_targets.append(Target(model_key(fqn), fqn, "model", tuple(t.shape), t.dtype, t.detach()))
            if kind == "buffer":
                live.buffers.add(fqn)
    if optimizer is None and engine is not None:
        optimizer = engine.optimizer
    if optimizer is None:
        return live
    if _is_ds_zero(optimizer):
        _collect_deepspeed(live, optimizer, name_of)
        return live
    if engine is not None and optimizer is not engine.optimizer and _is_ds_zero(engine.optimizer) \
            and getattr(engine.optimizer, "optimizer", None) is optimizer:
        _collect_deepspeed(live, engine.optimizer, name_of)
        return live
    if not isinstance(optimizer, ShardedOptimizer):
        raise TypeError(
            f"shardopt.checkpoint handles shardopt optimizers (Lion, AdamW, Muon), got {type(optimizer).__name__}"
        )
    _collect_sharded(live, optimizer, name_of)
    return live


def _fqn_for(p, i, names, name_of, gi):
    fqn = name_of.get(id(p))
    if fqn is None:
        n = names[i]
        if n.startswith("param_groups["):
            raise ValueError(
                f"shardopt.checkpoint cannot name {n} (shape {tuple(p.shape)}): it is not a parameter of the model "
                "passed in. Pass the model the optimizer was built from, or give the groups 'param_names'"
            )
        fqn = clean_name(n.removeprefix("module."))
    return fqn


def _collect_sharded(live: Live, opt: ShardedOptimizer, name_of: dict) -> None:
    layout = opt.layout
    opt.wait_param_gather()  # overlap_param_gather: the parameters are read (saved) or written (loaded) next
    live.layout = layout.name
    live.optimizer_class = type(opt).__name__
    params, names, gidx = opt._flat_params()
    group_fqns = [[] for _ in opt.param_groups]
    for i, p in enumerate(params):
        fqn = _fqn_for(p, i, names, name_of, gidx[i])
        if fqn in live.params:
            raise ValueError(f"parameter {fqn} appears twice in the optimizer's param groups")
        group = opt.param_groups[gidx[i]]
        st = opt.state[p]
        keys = [k for k, v in st.items() if k != "step" and torch.is_tensor(v)]
        describe = f"{fqn} (shape {tuple(p.shape)})"
        for k in keys:
            base = k.removesuffix(state_precision.SCALE_SUFFIX)
            if base != k and base in st:  # the block scales of int8 state `base`
                shape = state_precision.scale_shape(p.shape, layout.int8_block(i))
                pieces = state_pieces(layout, i, p, st[k], f"{describe} state '{k}'", scale=True)
                live.optim_targets.append(Target(optim_key(fqn, k), fqn, k, shape, st[k].dtype,
                                                 FlatPieces(math.prod(shape), st[k].dtype, pieces)))
                live.quantized.append(Quantized(fqn, base, layout, i, p, st))
                continue
            pieces = state_pieces(layout, i, p, st[k], f"{describe} state '{k}'")
            # stored in the state's own dtype (bf16 state as bf16); a load converts to the live one
            live.optim_targets.append(Target(optim_key(fqn, k), fqn, k, tuple(p.shape), st[k].dtype,
                                             FlatPieces(p.numel(), st[k].dtype, pieces)))
        live.params[fqn] = ParamInfo(fqn, tuple(p.shape), p.dtype, group["algorithm"], gidx[i], keys, [st])
        group_fqns[gidx[i]].append(fqn)
        if opt.master_weights and p.dtype in LOW_PRECISION and "master_param" in st:
            live.refresh_master.append((fqn, _master_refresher(layout, i, st)))
    live.groups = list(zip(opt.param_groups, group_fqns))


def _master_refresher(layout, i, st):
    def refresh():
        pv = layout.param_view(i)
        m = layout.local_state(st["master_param"])
        if m.numel():
            m.copy_(pv.detach().reshape(m.shape))
    return refresh


def _partition_values(st: dict, keys: list, live: Live) -> tuple[list, dict]:
    """The state keys of a DeepSpeed flat partition and the tensors its targets view.

    int8 state (codes + ``<key>_scale``, blocks counted from the partition's start) does not cut at parameter
    boundaries: it is saved dequantized, as fp32 per parameter, from a buffer made here; after a load the
    buffer is quantized back into the codes and scales in place (salt: the loaded step), so a resume is within
    one quantization step of the saved state, not bit for bit."""
    scale_of = {k: k + state_precision.SCALE_SUFFIX for k in keys if k + state_precision.SCALE_SUFFIX in st}
    keys = [k for k in keys if k not in set(scale_of.values())]
    values = {}
    for k in keys:
        if k not in scale_of:
            values[k] = st[k]
            continue
        kind = state_precision.int8_kind(k)
        buf = state_precision.Q8(st[k], st[scale_of[k]], kind).dequantize()
        values[k] = buf
        live.requantize.append(_requantizer(st, k, scale_of[k], buf, kind))
    return keys, values


def _requantizer(st, key, scale_key, buf, kind):
    def requantize():
        codes, scale = state_precision.quantize(buf, _steps.get(st), kind)
        st[key].copy_(codes.view(st[key].shape))
        st[scale_key].copy_(scale.view(st[scale_key].shape))
    return requantize


def _collect_deepspeed(live: Live, zo, name_of: dict) -> None:
    inner = zo.optimizer
    if not isinstance(inner, ShardedOptimizer):
        raise TypeError(
            f"shardopt.checkpoint.save/load inside DeepSpeed needs a shardopt optimizer; this engine runs "
            f"{type(inner).__name__}. Use engine.save_checkpoint and `shardopt ckpt convert --from deepspeed`"
        )
    inner._ensure_layout()  # DeepSpeed swapped the params for its flat fp32 partitions
    live.layout = "deepspeed-zero2" if getattr(zo, "partition_gradients", False) else "deepspeed-zero1"
    live.ds_stage = 2 if getattr(zo, "partition_gradients", False) else 1
    live.optimizer_class = type(inner).__name__
    groups = []
    for g, bit16 in enumerate(zo.round_robin_bit16_groups):
        group = inner.param_groups[g]
        flat = group["params"][0]
        st = inner.state[flat]
        keys, values = _partition_values(st, [k for k, v in st.items() if k != "step" and torch.is_tensor(v)], live)
        fp32 = zo.single_partition_of_fp32_groups[g]
        P = zo.partition_size[g]
        rank = dist.get_rank(group=zo.real_dp_process_group[g])
        base = rank * P
        fqns = []
        for p, off in zip(bit16, zo.round_robin_bit16_offsets[g]):
            fqn = name_of.get(id(p))
            if fqn is None:
                raise ValueError(f"a DeepSpeed-managed parameter of shape {tuple(p.shape)} is not in the model")
            n = p.numel()
            lo, hi = max(off, base), min(off + n, base + P)
            rng = [(lo - off, slice(lo - base, hi - base))] if lo < hi else []
            for k in keys:
                v = values[k]
                pieces = [(o, v[s]) for o, s in rng]
                live.optim_targets.append(Target(optim_key(fqn, k), fqn, k, tuple(p.shape), v.dtype,
                                                 FlatPieces(n, v.dtype, pieces)))
            low = p.dtype in LOW_PRECISION
            if low:
                pieces = [(o, fp32.data[s]) for o, s in rng]
                live.optim_targets.append(Target(optim_key(fqn, "master_param"), fqn, "master_param", tuple(p.shape),
                                                 torch.float32, FlatPieces(n, torch.float32, pieces)))
            live.params[fqn] = ParamInfo(fqn, tuple(p.shape), p.dtype, group["algorithm"], g,
                                         keys + (["master_param"] if low else []), [st])
            fqns.append(fqn)
            live.refresh_master.append((fqn, _ds_refresher(p, fp32, rng, low)))
        groups.append((group, fqns))
    live.groups = groups


def _ds_refresher(p, fp32, rng, low):
    def refresh():
        src = p.detach().reshape(-1)
        for o, s in rng:
            n = s.stop - s.start
            fp32.data[s].copy_(src[o:o + n].float())
    refresh.always = not low  # fp32 params: the master partition always follows the loaded weights
    return refresh
