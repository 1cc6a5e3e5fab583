"""``state_dict`` / ``load_state_dict`` in torch.optim's format, which moves both ways.

What ``state_dict()`` writes is torch's layout: ``{"state": {index: {"step":
tensor, <state keys>}}, "param_groups": [...]}`` with torch's key names
(``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, ``momentum_buffer``), so
``torch.optim.AdamW`` and ``torch.optim.Muon`` load a single-device (or
consolidated) shardopt state_dict, and shardopt loads theirs. On top of that:

* ``"shardopt": {"format", "layout", "world_size", "rank"}`` says where a state
  came from. A sharded state loads only into the same rank, world size and
  layout, by name, even where the local shapes happen to agree (a
  ``transformers.Trainer`` saving rank 0's file and loading it on every rank
  would otherwise hand rank 1 rank 0's shard);
* each param group carries ``"shardopt_format"``, which also survives
  ``torch.distributed.checkpoint`` (it keeps groups, not top-level keys).

State tensors load in the live group's ``state_dtype``, whatever the saved
one: a bf16 state into an fp32-state optimizer widens exactly, an fp32 (or
torch's) state into a bf16-state optimizer rounds to nearest once; the group
keeps its own ``state_dtype`` (:data:`LIVE_KEYS`). int8 state is saved as its
codes under the key's name plus ``<key>_scale``; it loads bit for bit into an
int8 optimizer, dequantized into any other, and fp32/bf16 state is quantized
(salt: the step) into an int8 one.

Format 1 (no marker, but groups name their ``algorithm``) stored Muon's
momentum as the plain sum ``m = mu*m + g``; it is converted to the EMA
``(1 - mu)*m`` on load. ``load`` checks everything before it changes anything.
"""
from __future__ import annotations

import collections
import warnings

import torch

from ..kernels import state_precision
from . import _steps

FORMAT = 2
# Run after each optimizer's own state_dict post-hooks, as ``hook(opt, state_dict)``, for integrations that must
# see saves they do not drive (shardopt.integrations._trainer_watch: transformers.Trainer saving one rank's shard).
GLOBAL_STATE_DICT_POST_HOOKS: list = []
# torch.optim's implementation switches; they mean nothing to shardopt's groups
TORCH_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")
# group settings that stay the live optimizer's on load: the saved state converts to them
# (state_dtype: bf16 -> fp32 is exact, fp32 -> bf16 rounds to nearest)
LIVE_KEYS = ("state_dtype",)


def _layout_meta(opt) -> dict:
    layout = opt._layout
    return {"format": FORMAT, "layout": layout.name, "world_size": layout.world_size, "rank": layout.rank}


def pack(opt) -> dict:
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    params, _, _ = opt._flat_params()
    index = {id(p): i for i, p in enumerate(params)}
    state = {}
    for p, st in opt.state.items():
        if id(p) not in index:
            continue
        state[index[id(p)]] = {k: (torch.tensor(float(_steps.get(st)), dtype=torch.float32) if k == "step" else v)
                               for k, v in st.items()}
    groups, start = [], 0
    for g in opt.param_groups:
        packed = {k: v for k, v in g.items() if k != "params"}
        packed["params"] = list(range(start, start + len(g["params"])))
        packed["shardopt_format"] = FORMAT
        start += len(g["params"])
        groups.append(packed)
    sd = {"state": dict(sorted(state.items())), "param_groups": groups, "shardopt": _layout_meta(opt)}
    for hook in opt._optimizer_state_dict_post_hooks.values():
        out = hook(opt, sd)
        if out is not None:
            sd = out
    for hook in GLOBAL_STATE_DICT_POST_HOOKS:
        hook(opt, sd)
    return sd


def _origin(sd: dict) -> str:
    groups = sd.get("param_groups", [])
    if sd.get("shardopt") or any("shardopt_format" in g for g in groups):
        return "shardopt"
    if any("algorithm" in g for g in groups):
        return "shardopt-1"
    return "torch"


def _group_names(opt) -> str:
    return "; ".join(f"{k}: {opt._where(k, g)} with {len(g['params'])} params" for k, g in enumerate(opt.param_groups))


def load(opt, state_dict: dict) -> None:
    from .base import ALGORITHMS, state_dtype

    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("load_state_dict needs a dict with 'state' and 'param_groups' (what state_dict() returns)")
    sd = dict(state_dict)
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        out = hook(opt, sd)
        if out is not None:
            sd = out
    groups, saved = opt.param_groups, sd["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(
            f"loaded state dict has {len(saved)} parameter group(s) but this optimizer has {len(groups)} "
            f"({_group_names(opt)}); build the optimizer with the groups it was saved with, or use "
            "shardopt.checkpoint.load(..., keep_param_groups=True) to take the per-parameter state only"
        )
    for gi, (g, s) in enumerate(zip(groups, saved)):
        if len(g["params"]) != len(s["params"]):
            raise ValueError(
                f"loaded state dict contains a parameter group that doesn't match the size of optimizer's group: "
                f"saved group {gi} has {len(s['params'])} parameters, {opt._where(gi, g)} has {len(g['params'])}"
            )
    origin = _origin(sd)
    layout = opt._layout
    params, _, gidx = opt._flat_params()
    meta = sd.get("shardopt") or {}
    if meta and params:
        mine = (layout.name, layout.world_size, layout.rank)
        theirs = (meta.get("layout"), meta.get("world_size"), meta.get("rank"))
        sharded = theirs[0] not in (None, "none") or mine[0] != "none"
        if sharded and theirs != mine:
            raise ValueError(
                f"shardopt: the state of {opt._describe(0)} was saved by rank {theirs[2]} of a {theirs[0]} layout "
                f"with world size {theirs[1]}, but this is rank {mine[2]} of a {mine[0]} layout with world size "
                f"{mine[1]}; a sharded state_dict holds one rank's pieces only. Save and load sharded optimizers "
                "with shardopt.checkpoint (any world size), or train with "
                "shardopt.integrations.transformers.ShardoptTrainer"
            )

    # the new groups: saved hyperparameters (as torch.optim does), our bookkeeping where the saved ones lack it
    new_groups = []
    for gi, (g, s) in enumerate(zip(groups, saved)):
        ng = {k: v for k, v in s.items() if k not in ("params", "shardopt_format") and k not in TORCH_IMPL_KEYS}
        algo = ng.get("algorithm", g["algorithm"])
        if algo != g["algorithm"]:
            raise ValueError(
                f"saved param group {gi} was stepped by {algo}, but {opt._where(gi, g)} runs {g['algorithm']}; "
                f"{algo} state cannot drive {g['algorithm']}. Build the optimizer the state came from"
            )
        ng["algorithm"] = algo
        for k, v in g.items():
            if k != "params":
                ng.setdefault(k, v)
        for k in LIVE_KEYS:  # how this optimizer stores its state is its own choice, not the saved one's
            if k in g:
                ng[k] = g[k]
        if "param_names" in g:
            ng["param_names"] = g["param_names"]
        ALGORITHMS[algo].validate(ng, opt._where(gi, ng | {"params": g["params"]}))
        new_groups.append(ng)

    # the new state, one parameter at a time, into fresh tensors
    saved_ids = [pid for s in saved for pid in s["params"]]
    saved_state = sd["state"]
    new_state = collections.defaultdict(dict)
    converted = False
    for i, p in enumerate(params):
        group = new_groups[gidx[i]]
        algo = ALGORITHMS[group["algorithm"]]
        keys = algo.state_keys(group)
        src = saved_state.get(saved_ids[i]) or {}
        if not isinstance(src, dict):
            raise ValueError(f"state of {opt._describe(i)} is a {type(src).__name__}, expected a dict")
        scale_keys = {k + state_precision.SCALE_SUFFIX for k in keys}
        unknown = sorted(set(src) - {"step", "master_param", *keys, *scale_keys})
        missing = sorted(set(keys) - set(src))
        if src and set(src) != {"step"} and (unknown or missing):
            raise ValueError(
                f"state of {opt._describe(i)} has keys {sorted(src)}, but its {group['algorithm']} group "
                f"expects {['step', *keys]}"
                + (" (amsgrad keeps max_exp_avg_sq)" if "max_exp_avg_sq" in unknown + missing else "")
            )
        try:
            step = _steps.as_int(src.get("step", 0))
        except ValueError as e:
            raise ValueError(f"state of {opt._describe(i)}: {e}") from e
        want = tuple(layout.local_shape(i))
        st = {"step": step}
        q8 = opt._int8_param(i, p, group)
        for k in keys:
            if k in src:
                v = src[k]
                if not torch.is_tensor(v):
                    raise ValueError(f"state '{k}' of {opt._describe(i)} is a {type(v).__name__}, expected a tensor")
                loc = _local(v)
                if tuple(loc.shape) != want:
                    raise ValueError(
                        f"shardopt: state '{k}' of {opt._describe(i)} has local shape {tuple(loc.shape)}, but this "
                        f"rank's {layout.name} layout (world size {layout.world_size}) expects {want}. The state_dict "
                        "was saved with another world size or layout: load it with shardopt.checkpoint.load, "
                        "which reshards"
                    )
                sk = k + state_precision.SCALE_SUFFIX
                saved_q8 = None
                if sk in src:  # saved as int8 blocks
                    if not torch.is_tensor(src[sk]) or tuple(_local(src[sk]).shape) != layout.local_scale_shape(i):
                        raise ValueError(
                            f"shardopt: state '{sk}' of {opt._describe(i)} does not match this rank's "
                            f"{layout.name} layout (expected block scales of shape {layout.local_scale_shape(i)}); "
                            "load it with shardopt.checkpoint.load, which reshards")
                    saved_q8 = state_precision.Q8(loc.detach().to(_dev(p)), _local(src[sk]).detach().to(_dev(p)),
                                                  state_precision.int8_kind(k),
                                                  layout.int8_block(i) or state_precision.BLOCK)
                if q8:
                    if saved_q8 is not None and saved_q8.codes.dtype == state_precision.code_dtype(
                            state_precision.int8_kind(k)):
                        opt._put_int8(st, i, k, codes=saved_q8.codes.clone(), scale=saved_q8.scale.clone())  # bit for bit
                    else:
                        val = saved_q8.dequantize() if saved_q8 is not None else loc.detach().to(_dev(p), torch.float32)
                        opt._put_int8(st, i, k, values=val, step=step)
                    continue
                val = saved_q8.dequantize() if saved_q8 is not None else loc.detach()
                val = val.to(device=_dev(p), dtype=state_dtype(p, group), copy=True)
                if origin == "shardopt-1" and group["algorithm"] == "muon" and k == "momentum_buffer":
                    val.mul_(1.0 - float(group["momentum"]))  # the old sum form -> the EMA
                    converted = True
            elif q8:
                opt._put_int8(st, i, k, device=_dev(p))
                continue
            else:
                val = torch.zeros(want, dtype=state_dtype(p, group), device=_dev(p))
            st[k] = layout.wrap_state(i, val)
        old = opt.state.get(p, {})
        if "master_param" in old:
            if torch.is_tensor(src.get("master_param")) and tuple(_local(src["master_param"]).shape) == want:
                m = _local(src["master_param"]).detach().to(device=_dev(p), dtype=torch.float32, copy=True)
            else:  # the saved state has no fp32 master (torch's never does): take it from the weights
                m = layout.param_view(i).detach().float().clone()
            st["master_param"] = layout.wrap_state(i, m)
        new_state[p] = st

    # commit: nothing above touched the optimizer
    for g, ng in zip(groups, new_groups):
        ps = g["params"]
        g.clear()
        g.update(ng)
        g["params"] = ps
    opt.state = new_state
    if converted:
        warnings.warn("shardopt: converted Muon momentum from the old sum form (m = mu*m + g) to the EMA torch "
                      "keeps ((1 - mu)*m); the trajectory is unchanged", RuntimeWarning, stacklevel=3)
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def _local(v):
    return v._local_tensor if type(v).__name__ == "DTensor" else v


def _dev(p):
    return p._local_tensor.device if type(p).__name__ == "DTensor" else p.device
