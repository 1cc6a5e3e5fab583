"""DeepSpeed integration: shardopt optimizers named in a DeepSpeed JSON config.

``import shardopt.deepspeed`` calls :func:`install`. After that an unmodified
``deepspeed.initialize(model=..., model_parameters=..., config=cfg)`` accepts::

    "optimizer": {"type": "shardopt.Lion" | "shardopt.AdamW" | "shardopt.Muon",
                  "params": {...constructor keyword arguments...}}

What the engine then does:

* **Lion / AdamW, ZeRO-1/2/3.** DeepSpeed partitions as usual and hands its
  flat fp32 partitions to the shardopt optimizer, built with
  ``sharding="none"`` so it does not shard a second time. The non-finite check
  is summed over DeepSpeed's data-parallel group, so every rank skips
  together. DeepSpeed steps one param group at a time, so clipping is left to
  its ``gradient_clipping`` (``grad_clip_norm`` is refused).
* **Muon, ZeRO-1/2/3.** DeepSpeed partitions as it does for Adam: gradients
  are partitioned (ZeRO-2), parameters too (ZeRO-3), and the optimizer sees
  the flat fp32 partitions. :class:`shardopt.sharding.flat.FlatPartitionLayout`
  knows which element range of every Muon matrix each rank holds: one
  all-to-all per step assembles each matrix on its owner (LPT by
  Newton-Schulz cost), the owner orthogonalizes it once, and a second
  all-to-all returns the pieces. The momentum stays on DeepSpeed's partitions.
  At ZeRO-1/2 the gradient buckets are reduce-scattered (an all-to-all and a
  local sum) instead of all-reduced, since no rank needs gradients outside its
  partition any more. The parameter groups come from
  :func:`shardopt.muon_param_groups` on the model's named parameters.
* **Lion / AdamW / Muon, stage 0.** Full replicas (``sharding="none"``) unless
  ``params`` asks for ``"sharding": "zero1"``; Muon defaults to shardopt's
  ZeRO-1 there.
* **bf16 at stage 0.** The engine calls the shardopt optimizer directly (not
  DeepSpeed's bf16 wrapper): shardopt keeps the fp32 master copy, sharded the
  way its state is, and applies DeepSpeed's ``gradient_clipping``.
* **state_dtype.** bf16 state at every stage. int8 at ZeRO-1/2: every flat
  partition of at least 4096 elements keeps codes and ``<key>_scale`` in
  blocks of 256 counted from the partition's own start
  (:class:`shardopt.sharding.flat.PartitionLayout` for Lion/AdamW,
  :class:`~shardopt.sharding.flat.FlatPartitionLayout` for Muon); refused at
  ZeRO-3 and with DeepSpeed's ``elastic_checkpoint``. A universal checkpoint
  read at ZeRO-1/2 is stored in the groups' ``state_dtype`` again
  (:func:`restore_state_formats`).
* **Optimizer offload** (``"offload_optimizer": {"device": "cpu"}``): the
  partitions live on the CPU and shardopt's C++ CPU kernels update them.
  DeepSpeed refuses client optimizers there unless
  ``zero_force_ds_cpu_optimizer`` is false; the integration sets it and logs
  one line.
* **Checkpoints.** Under ZeRO, DeepSpeed saves each rank's partition state as
  usual (Muon's momentum included), and universal checkpoints load it at
  another world size. At stage 0 with a sharded shardopt layout, every rank's
  optimizer state is gathered into the one file DeepSpeed writes, and each
  rank takes its own part back on load (same world size).

The patches are narrow: DeepSpeed's own optimizer types go through its own
code unchanged, and :func:`install` is idempotent.
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..optim import AdamW, Lion, Muon, ShardedOptimizer, muon_param_groups
from ..optim._report import ExternalPartitioning
from ..optim.base import ALGORITHMS, state_dtype
from ..sharding import comm

PREFIX = "shardopt."
_MARK = "_shardopt_patched"


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer a DeepSpeed config may name."""

    name: str  # as written in configs
    cls: type
    extra: tuple = ()  # config keys beyond the constructor's


MUON_AUX_KEYS = ("aux_algorithm", "aux_lr", "aux_betas", "aux_weight_decay", "aux_eps", "muon", "aux")
OPTIMIZERS = {
    e.name.lower(): e
    for e in (
        OptimizerEntry("shardopt.Lion", Lion),
        OptimizerEntry("shardopt.AdamW", AdamW),
        OptimizerEntry("shardopt.Muon", Muon, MUON_AUX_KEYS),
    )
}
# Constructor arguments a JSON config cannot or must not set: DeepSpeed owns the
# process group and the gradient reduction.
_NOT_FROM_CONFIG = {"self", "params", "defaults", "kwargs", "process_group", "reduce_gradients"}
_DTYPE_KEYS = ("ns_dtype", "comm_dtype")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def valid_names() -> str:
    return ", ".join(e.name for e in OPTIMIZERS.values())


def is_shardopt_type(name) -> bool:
    return isinstance(name, str) and name.lower().startswith(PREFIX)


def entry_for(name: str) -> OptimizerEntry:
    entry = OPTIMIZERS.get(name.lower()) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"unknown DeepSpeed optimizer type {name!r}; shardopt provides: {valid_names()}")
    return entry


def config_keys(entry: OptimizerEntry) -> list[str]:
    """The ``optimizer.params`` keys ``entry`` accepts: its constructor's and the base class's."""
    keys = []
    for fn in (entry.cls.__init__, ShardedOptimizer.__init__):
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in _NOT_FROM_CONFIG or p.name in keys:
                continue
            keys.append(p.name)
    return keys + list(entry.extra)


@dataclass
class Resolved:
    """A validated ``optimizer`` entry, kept on DeepSpeed's config object."""

    entry: OptimizerEntry
    kwargs: dict  # constructor keyword arguments
    aux: dict = field(default_factory=dict)  # Muon: muon_param_groups keyword arguments
    requested_stage: int = 0  # ZeRO stage in the user's config
    stage: int = 0  # ZeRO stage DeepSpeed runs


def _to_dtype(key, value, entry):
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.lower().removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(
        f"{entry.name}: invalid {key} {value!r} in the DeepSpeed config's optimizer.params; "
        f"use one of {', '.join(sorted(_DTYPES))} or null"
    )


def resolve(type_name: str, params, zero_stage: int) -> Resolved:
    """Validate an ``optimizer`` entry and decide how it runs at ``zero_stage``.

    Raises ``ValueError`` naming the valid types or keys.
    """
    entry = entry_for(type_name)
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise ValueError(f"{entry.name}: optimizer.params must be a JSON object, got {type(params).__name__}")
    valid = config_keys(entry)
    unknown = sorted(k for k in params if k not in valid)
    if unknown:
        hint = ""
        if "max_grad_norm" in unknown:
            hint = " (for gradient clipping use DeepSpeed's top-level \"gradient_clipping\")"
        raise ValueError(
            f"{entry.name}: unknown parameter(s) {', '.join(map(repr, unknown))} in the DeepSpeed config's "
            f"optimizer.params{hint}; valid: {', '.join(valid)}"
        )
    kwargs = {k: v for k, v in params.items() if k not in entry.extra}
    aux = {k: v for k, v in params.items() if k in entry.extra}
    for k in _DTYPE_KEYS:
        if k in kwargs:
            kwargs[k] = _to_dtype(k, kwargs[k], entry)
    for k in ("betas", "ns_coefficients"):
        if isinstance(kwargs.get(k), list):
            kwargs[k] = tuple(kwargs[k])
    if isinstance(aux.get("aux_betas"), list):
        aux["aux_betas"] = tuple(aux["aux_betas"])
    sharding = kwargs.get("sharding")
    if zero_stage >= 1:
        if sharding not in (None, "auto", "none"):
            raise ValueError(
                f"{entry.name}: \"sharding\": {sharding!r} cannot be used with DeepSpeed ZeRO stage {zero_stage}: "
                "DeepSpeed already partitions the optimizer state and shardopt runs on its partitions; "
                "drop \"sharding\" (or set it to \"none\")"
            )
        if kwargs.get("grad_clip_norm") is not None:
            raise ValueError(
                f"{entry.name}: grad_clip_norm cannot be used with DeepSpeed ZeRO stage {zero_stage}, which steps "
                "one parameter group at a time; use DeepSpeed's top-level \"gradient_clipping\" instead"
            )
        kwargs["sharding"] = "none"
        if zero_stage >= 3 and kwargs.get("state_dtype") == "int8":
            raise ValueError(_int8_zero3_message(entry.name))
    else:
        kwargs.setdefault("sharding", "auto" if entry.cls is Muon else "none")
    if entry.cls is Muon:
        aux_alg = aux.get("aux_algorithm", "adamw")
        if aux_alg not in ("adamw", "lion"):
            raise ValueError(f"shardopt.Muon: aux_algorithm must be 'adamw' or 'lion', got {aux_alg!r}")
        for k in ("muon", "aux"):
            v = aux.get(k)
            if v is not None and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
                raise ValueError(f"shardopt.Muon: {k!r} must be a list of parameter-name substrings, got {v!r}")
    _check_values(entry, kwargs, aux)
    return Resolved(entry, kwargs, aux, zero_stage, zero_stage)


def _int8_zero3_message(what: str) -> str:
    return (f"{what}: state_dtype='int8' is not supported under DeepSpeed ZeRO-3; int8 state runs at ZeRO "
            "stage 0, 1 and 2 (use one of those), or keep ZeRO-3 with state_dtype='bf16'")


def _int8_groups(opt: ShardedOptimizer) -> bool:
    return any(g.get("state_dtype") == "int8" for g in opt.param_groups)


def _check_values(entry: OptimizerEntry, kwargs: dict, aux: dict) -> None:
    """Build the optimizer on a tiny local stand-in so bad values fail at config time, by name."""
    probe = dict(kwargs, sharding="none")
    w = {"params": [torch.nn.Parameter(torch.zeros(2, 2))], "param_names": ["a stand-in 2-D parameter"]}
    try:
        if entry.cls is Muon:
            aux_group = {"params": [torch.nn.Parameter(torch.zeros(2))], "param_names": ["a stand-in bias"],
                         "algorithm": aux.get("aux_algorithm", "adamw")}
            for key, gkey in (("aux_lr", "lr"), ("aux_betas", "betas"), ("aux_weight_decay", "weight_decay"),
                              ("aux_eps", "eps")):
                if aux.get(key) is not None:
                    aux_group[gkey] = aux[key]
            entry.cls([w, aux_group], **probe)
        else:
            entry.cls([w], **probe)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{entry.name}: invalid optimizer.params in the DeepSpeed config: {e}") from e


# ---------------------------------------------------------------------------- building
def _named(module) -> dict:
    return {id(p): n for n, p in module.named_parameters()}


def _flatten(model_parameters) -> list:
    out = []
    for item in model_parameters:
        if isinstance(item, dict):
            out.extend(item["params"])
        else:
            out.append(item)
    return out


def _muon_groups(module, model_parameters, aux: dict, rank0: bool) -> list[dict]:
    groups = muon_param_groups(module, **aux)
    given = _flatten(model_parameters)
    ids = {id(p) for p in given}
    known = _named(module)
    stray = [p for p in given if id(p) not in known]
    if stray:
        raise ValueError(
            f"shardopt.Muon: {len(stray)} of model_parameters (e.g. shape {tuple(stray[0].shape)}) are not "
            "parameters of the model given to deepspeed.initialize; Muon builds its groups from the model's "
            "named parameters"
        )
    if rank0 and any(isinstance(g, dict) and set(g) - {"params"} for g in model_parameters):
        _ds_logger().warning(
            "shardopt: per-group settings in model_parameters are not used by shardopt.Muon; its groups come from "
            "shardopt.muon_param_groups (Muon matrices + the aux group set by aux_* in optimizer.params)"
        )
    out = []
    for g in groups:
        keep = [k for k, p in enumerate(g["params"]) if id(p) in ids]
        if keep:
            out.append(dict(g, params=[g["params"][k] for k in keep],
                            param_names=[g["param_names"][k] for k in keep]))
    return out


def _with_names(module, model_parameters) -> list:
    """Stage 0: attach FQNs so shardopt's errors name parameters (DeepSpeed keeps them in place)."""
    known = _named(module)
    groups = [dict(g) if isinstance(g, dict) else None for g in model_parameters]
    if all(g is None for g in groups):
        params = list(model_parameters)
        if params and all(id(p) in known for p in params):
            return [{"params": params, "param_names": [known[id(p)] for p in params]}]
        return params
    if any(g is None for g in groups):
        return list(model_parameters)
    for g in groups:
        ps = list(g["params"])
        g["params"] = ps
        if "param_names" not in g and all(id(p) in known for p in ps):
            g["param_names"] = [known[id(p)] for p in ps]
    return groups


def build_optimizer(engine, resolved: Resolved, model_parameters) -> ShardedOptimizer:
    rank0 = engine.global_rank == 0
    kwargs = dict(resolved.kwargs)
    if resolved.entry.cls is Muon:
        params = _muon_groups(engine.module, model_parameters, resolved.aux, rank0)
        _untag_deepspeed_muon(engine.module)
    elif resolved.stage == 0:
        params = _with_names(engine.module, model_parameters)
    else:
        # DeepSpeed replaces each group's params with one flat partition: names would not line up.
        params = list(model_parameters)
    if resolved.stage == 0:
        kwargs.setdefault("process_group", engine.seq_data_parallel_group)
    try:
        return resolved.entry.cls(params, **kwargs)
    except TypeError as e:
        valid = ", ".join(config_keys(resolved.entry))
        raise ValueError(f"{resolved.entry.name}: {e}; valid optimizer.params: {valid}") from e


def _untag_deepspeed_muon(module) -> None:
    """DeepSpeed's ZeRO-1/2 runs its own Muon update on parameters tagged ``use_muon`` whenever the optimizer's
    class name contains "muon" (ours does); a model once trained with ``"type": "Muon"`` carries the tag."""
    for p in module.parameters():
        if getattr(p, "use_muon", False):
            p.use_muon = False


# ---------------------------------------------------------------------------- engine glue
def _ds_logger():
    from deepspeed.utils import logger

    return logger


def _zero_stage_of(param_dict: dict) -> int:
    zero = param_dict.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        return 0
    try:
        return int(zero.get("stage", 0))
    except (TypeError, ValueError):
        return 0


def _check_fits_zero(engine, opt: ShardedOptimizer) -> None:
    """Refuse or adjust what cannot run on DeepSpeed's ZeRO partitions.

    Config-built optimizers already fit (see :func:`resolve`); this catches a shardopt optimizer the user
    built and passed as ``deepspeed.initialize(optimizer=...)``.
    """
    if not engine.zero_optimization():
        return
    stage = engine.zero_optimization_stage()
    if _int8_groups(opt):
        if stage >= 3:
            raise ValueError(_int8_zero3_message(f"{type(opt).__name__}"))
        if engine.zero_elastic_checkpoint():
            raise ValueError(
                f"{type(opt).__name__}: state_dtype='int8' cannot be used with DeepSpeed's "
                "zero_optimization.elastic_checkpoint, which cuts every state tensor of a partition to the "
                "partition's length (the int8 block scales are shorter); set \"elastic_checkpoint\": false (the "
                "default) and change world sizes with `shardopt ckpt convert --from deepspeed` or shardopt.checkpoint"
            )
    if opt.grad_clip_norm is not None:
        raise ValueError(
            f"{type(opt).__name__}(grad_clip_norm=...) cannot be used with DeepSpeed ZeRO-{stage}, which steps one "
            "parameter group at a time; use DeepSpeed's \"gradient_clipping\" instead"
        )
    if opt.sharding == "none":
        return
    if opt.sharding == "auto" and all(float(st.get("step", 0)) == 0 for st in opt.state.values()):
        opt.sharding = "none"
        if engine.global_rank == 0:
            _ds_logger().warning(
                f"shardopt: DeepSpeed ZeRO-{stage} partitions the optimizer state itself; "
                f"{type(opt).__name__}(sharding='auto') runs on its partitions with sharding='none'"
            )
        return
    raise ValueError(
        f"{type(opt).__name__}(sharding={opt.sharding!r}) cannot be used with DeepSpeed ZeRO-{stage}, which already "
        "partitions the optimizer state; build it with sharding='none' (or name it in the DeepSpeed config)"
    )


def _dp_group(engine):
    """The data-parallel group DeepSpeed partitions the optimizer state over."""
    return getattr(engine.optimizer, "dp_process_group", None) or engine.seq_data_parallel_group


def _install_group_reductions(engine, opt: ShardedOptimizer) -> None:
    """Under ZeRO each rank holds a disjoint partition: sum the scalars (grad norm, non-finite flag) over DP.

    DeepSpeed narrows ``param_groups`` while it steps one group at a time, which rebuilds the (local)
    layout, so the reduction is re-attached whenever the layout is rebuilt.
    """
    group = _dp_group(engine)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    class_ensure = opt._ensure_layout

    def all_reduce_sum(t):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def _ensure_layout(key=None):
        class_ensure(key)
        opt._layout.all_reduce_sum = all_reduce_sum

    opt._ensure_layout = _ensure_layout
    _ensure_layout()


def _stage0_state_dict(self):
    sd = ShardedOptimizer.state_dict(self)
    layout = self.layout
    if layout.world_size <= 1 or layout.name == "none":
        return sd
    bundle: list = [None] * layout.world_size
    dist.all_gather_object(bundle, sd, group=layout.group)
    return {"shardopt_per_rank": bundle, "layout": layout.name, "world_size": layout.world_size}


def _stage0_load_state_dict(self, state_dict, load_optimizer_states=True, **_ignored):
    if not load_optimizer_states:
        return
    layout = self.layout
    if "shardopt_per_rank" in state_dict:
        if state_dict["world_size"] != layout.world_size or state_dict["layout"] != layout.name:
            raise ValueError(
                f"shardopt: this DeepSpeed checkpoint holds {state_dict['layout']} optimizer state for "
                f"{state_dict['world_size']} ranks, but the optimizer now runs {layout.name} on "
                f"{layout.world_size}; load it at the world size it was saved with"
            )
        state_dict = state_dict["shardopt_per_rank"][layout.rank]
    elif layout.world_size > 1 and layout.name != "none":
        raise ValueError(
            "shardopt: the checkpoint's optimizer state is not sharded but the optimizer now runs "
            f"{layout.name} on {layout.world_size} ranks; load it with the sharding it was saved with"
        )
    ShardedOptimizer.load_state_dict(self, state_dict)


def _has_matrices(opt: ShardedOptimizer) -> bool:
    return any(ALGORITHMS[g["algorithm"]].matrix for g in opt.param_groups)


def _same_ranks(a, b) -> bool:
    if a is b:
        return True
    ranks = getattr(dist, "get_process_group_ranks", None)
    world = dist.group.WORLD
    return ranks is not None and ranks(a if a is not None else world) == ranks(b if b is not None else world)


def _flat_plan(engine, opt: ShardedOptimizer):
    """The geometry of DeepSpeed's partitions, as :class:`shardopt.sharding.flat.FlatPlan` (same on every rank)."""
    from ..sharding.flat import FlatPlan, build_group
    from ..sharding.plan import contiguous_pieces, per_item_pieces

    zo = engine.optimizer
    stage = engine.zero_optimization_stage()
    group = zo.dp_process_group
    W = dist.get_world_size(group)
    names = engine.param_names
    groups, binds = [], []

    def name(p):
        return names.get(p) or f"a parameter of shape {tuple(getattr(p, 'ds_shape', p.shape))}"

    if stage in (1, 2):
        for i, items in enumerate(zo.round_robin_bit16_groups):
            if not _same_ranks(zo.real_dp_process_group[i], group):
                raise NotImplementedError(
                    f"shardopt.{type(opt).__name__} under DeepSpeed ZeRO-{stage}: param group {i} is reduced over "
                    "another process group (MoE expert parallelism), which shardopt's flat-partition layout does "
                    "not support; keep expert parameters out of the shardopt optimizer"
                )
            matrix = ALGORITHMS[opt.param_groups[i]["algorithm"]].matrix
            meta = zo.round_robin_bit16_meta[i]
            P = int(zo.partition_size[i])
            pieces = contiguous_pieces([m.numel() for m in meta], list(zo.round_robin_bit16_offsets[i]), P, W)
            key = f"group{i}"
            groups.append(build_group(key, [name(p) for p in items], [tuple(m.shape) for m in meta],
                                      [matrix] * len(items), pieces, [P] * W))
            binds.append((zo.single_partition_of_fp32_groups[i], key))
    else:
        for sg, items in enumerate(zo.fp16_groups):
            if not _same_ranks(zo._get_sub_group_process_group(sg), group):
                raise NotImplementedError(
                    f"shardopt.{type(opt).__name__} under DeepSpeed ZeRO-3: sub-group {sg} is partitioned over "
                    "another process group (hierarchical partitioning or MoE), which shardopt's flat-partition "
                    "layout does not support"
                )
            numels = [int(p.ds_numel) for p in items]
            for p, n in zip(items, numels):
                if int(p.ds_tensor.ds_numel) != -(-n // W):
                    raise NotImplementedError(f"shardopt: {name(p)} has a ZeRO-3 partition of {p.ds_tensor.ds_numel} "
                                              f"elements, expected ceil({n}/{W}); this partitioning is not supported")
            matrix = ALGORITHMS[opt.param_groups[zo.sub_group_to_group_id[sg]]["algorithm"]].matrix
            key = f"sub_group{sg}"
            groups.append(build_group(key, [name(p) for p in items], [tuple(p.ds_shape) for p in items],
                                      [matrix] * len(items), per_item_pieces(numels, W),
                                      [sum(-(-n // W) for n in numels)] * W))
            binds.append((zo.fp32_partitioned_groups_flat[sg], key))
    plan = FlatPlan(groups, group, name=f"deepspeed-zero{stage}", comm_dtype=opt.comm_dtype)
    for t, key in binds:
        plan.bind(t, key)
    dev = binds[0][0].device if binds else torch.device("cpu")
    comm.check_ranks_agree(plan.signature(), group, dev, f"DeepSpeed ZeRO-{stage} partition layout")
    return plan


def _install_flat_layout(engine, opt: ShardedOptimizer) -> None:
    """Muon under ZeRO: the layout over DeepSpeed's flat partitions (and its group's stats all-reduce)."""
    plan = _flat_plan(engine, opt)
    for g in opt.param_groups:
        g.pop("param_names", None)  # the params are DeepSpeed's flat partitions now; the plan keeps the FQNs
    opt._layout_factory = plan.layout_for
    opt._layout = None
    opt._shardopt_plan = plan
    opt.layout  # build it (and the state) now
    if engine.zero_optimization_stage() in (1, 2) and getattr(engine.optimizer, "reduce_scatter", True):
        _reduce_scatter_buckets(engine.optimizer)


def _reduce_scatter_buckets(zo) -> None:
    """ZeRO-1/2 all-reduces each gradient bucket and every rank keeps its partition's slices. With Muon on the
    flat layout no rank needs the rest, so reduce-scatter the bucket instead: one all-to-all that sends each
    slice to the rank that keeps it, and a local sum. Buckets a slice of which several ranks keep are left to
    DeepSpeed."""
    orig = zo.allreduce_and_copy_with_multiple_ranks

    def allreduce_and_copy_with_multiple_ranks(small_bucket, communication_data_type, log=None, divide=True,
                                               process_group=None, bucket_ranks=None, output_bucket=None):
        group = zo.dp_process_group if process_group is None else process_group
        dsts = []
        for r in bucket_ranks or []:
            if isinstance(r, frozenset):
                r = next(iter(r)) if len(r) == 1 else None
            dsts.append(r)
        if not small_bucket or any(d is None for d in dsts) or getattr(zo, "sequence_parallel_size", 1) != 1:
            return orig(small_bucket, communication_data_type, log=log, divide=divide, process_group=process_group,
                        bucket_ranks=bucket_ranks, output_bucket=output_bucket)
        W, me = comm.world(group)
        dtype = communication_data_type
        order = sorted(range(len(small_bucket)), key=lambda k: dsts[k])
        send = torch.cat([small_bucket[k].reshape(-1) for k in order]).to(dtype)
        if divide and zo.gradient_average:
            send.div_(W)
        splits = [sum(small_bucket[k].numel() for k in order if dsts[k] == d) for d in range(W)]
        recv = torch.empty(W * splits[me], dtype=dtype, device=send.device)
        comm.all_to_all_single(recv, send, [splits[me]] * W, splits, group, me)
        reduced = recv.view(W, splits[me]).sum(0, dtype=torch.float32).to(dtype)
        off = 0
        outputs = output_bucket if output_bucket is not None else [None] * len(small_bucket)
        for k in order:
            if dsts[k] != me:
                continue
            n = small_bucket[k].numel()
            synced = reduced[off:off + n].view_as(small_bucket[k])
            off += n
            zo._add_to_grad_partition_buffer(outputs[k], synced)
            small_bucket[k].copy_(synced)

    zo.allreduce_and_copy_with_multiple_ranks = allreduce_and_copy_with_multiple_ranks


def _load_universal_stage3(zo, opt: ShardedOptimizer) -> None:
    """ZeRO-3 reads universal checkpoints with Adam's state keys written in (fp32, exp_avg, exp_avg_sq) and
    group 0's hyperparameters for every group. For a shardopt optimizer, read each group's own state keys
    (Lion's and Muon's momentum_buffer), its own hyperparameters and each partition's step."""
    import os

    def load(checkpoint_dir):
        if zo.swap_optimizer:
            raise NotImplementedError("shardopt: loading a universal checkpoint into a ZeRO-3 optimizer swapped "
                                      "to NVMe is not supported; use offload_optimizer device cpu")
        zdir = os.path.join(checkpoint_dir, "zero")
        optim_sd = torch.load(os.path.join(zdir, "optimizer_state.pt"), weights_only=False)
        zo._load_global_state_stage3(optim_sd)
        saved_groups = optim_sd.get("param_groups") or optim_sd["optimizer_state_dict"]["param_groups"]
        if len(saved_groups) != len(opt.param_groups):
            raise ValueError(f"shardopt: the universal checkpoint has {len(saved_groups)} param groups, the "
                             f"optimizer {len(opt.param_groups)}; build it with the groups it was saved with")
        for g, saved in zip(opt.param_groups, saved_groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        for sg, params in enumerate(zo.fp16_groups):
            flat = zo.fp32_partitioned_groups_flat[sg]
            group = opt.param_groups[zo.sub_group_to_group_id[sg]]
            st = opt.state[flat]
            for key in ("fp32", *ALGORITHMS[group["algorithm"]].state_keys(group)):
                buf = torch.zeros_like(flat)
                off = 0
                for p in params:
                    folder = os.path.join(zdir, zo.param_names[p])
                    if not os.path.exists(os.path.join(folder, f"{key}.pt")):
                        raise ValueError(
                            f"shardopt: the universal checkpoint has no '{key}' for {zo.param_names[p]} ({folder}), "
                            f"which the {group['algorithm']} group it belongs to needs; write it from a checkpoint "
                            "of the same optimizer (shardopt ckpt convert --to deepspeed-universal)"
                        )
                    part = zo.load_hp_checkpoint_state(folder, key, param=p)
                    buf.narrow(0, off, part.numel()).copy_(part)
                    off += part.numel()
                if key == "fp32":
                    flat.data.copy_(buf)
                else:
                    st[key] = buf.to(state_dtype(flat, group))  # the group's state precision (bf16 rounds)
            step_file = os.path.join(zdir, zo.param_names[params[0]], "step.pt") if params else None
            if step_file and os.path.exists(step_file):
                st["step"] = int(float(torch.load(step_file, weights_only=False)))
        for sg, flat in enumerate(zo.fp32_partitioned_groups_flat):
            if flat.numel():
                zo.fp16_partitioned_groups_flat[sg].data.copy_(flat.data)
            for part, q in zip(zo.fp16_partitioned_groups[sg],
                               zo.unflatten(zo.fp16_partitioned_groups_flat[sg], zo.fp16_partitioned_groups[sg])):
                part.data = q.data

    zo.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = load


def restore_state_formats(opt: ShardedOptimizer) -> bool:
    """Store every state tensor of ``opt`` in its group's ``state_dtype`` again, after a loader (DeepSpeed's
    universal checkpoint reader) replaced some with fp32 tensors: int8 ones are quantized (salt: the step),
    bf16 ones rounded to nearest, as :meth:`~shardopt.ShardedOptimizer.load_state_dict` converts. Returns
    whether anything changed."""
    from ..kernels import state_precision as sp
    from ..optim import _steps

    opt._ensure_layout()
    params, _, gidx = opt._flat_params()
    changed = False
    for i, p in enumerate(params):
        group = opt.param_groups[gidx[i]]
        st = opt.state.get(p)
        if not st:
            continue
        q8 = opt._int8_param(i, p, group)
        for k in ALGORITHMS[group["algorithm"]].state_keys(group):
            v = st.get(k)
            if not torch.is_tensor(v):
                continue
            if q8:
                kind = sp.int8_kind(k)
                if v.dtype == sp.code_dtype(kind) and k + sp.SCALE_SUFFIX in st:
                    continue
                opt._put_int8(st, i, k, values=v, step=_steps.get(st))
                changed = True
            elif v.dtype != state_dtype(p, group):
                st[k] = v.detach().to(state_dtype(p, group))
                changed = True
    return changed


def _load_universal_stage12(zo, opt: ShardedOptimizer) -> None:
    """ZeRO-1/2 read a universal checkpoint into fresh fp32 state tensors (one per key and partition): store
    them in the groups' state_dtype again (int8: quantized in the partition's own blocks) and relink
    DeepSpeed's per-parameter views of the state."""
    orig = zo.load_hp_checkpoint_state_from_checkpoint_dir

    def load(lp_groups_name, checkpoint_dir):
        orig(lp_groups_name, checkpoint_dir)
        if restore_state_formats(opt):
            zo._link_all_hp_params()

    zo.load_hp_checkpoint_state_from_checkpoint_dir = load


def _after_configure_optimizer(engine) -> None:
    opt = engine.basic_optimizer
    if not isinstance(opt, ShardedOptimizer):
        return
    if _has_matrices(opt):
        _untag_deepspeed_muon(engine.module)
    if engine.zero_optimization():
        if _has_matrices(opt):
            _install_flat_layout(engine, opt)
            how = (f"on DeepSpeed ZeRO-{engine.zero_optimization_stage()}'s flat fp32 partitions; each Muon matrix "
                   "is assembled on its owner rank and orthogonalized once")
        else:
            from ..sharding.flat import partition_layout

            opt._layout_factory = partition_layout  # int8 state in blocks of each partition's own
            opt.layout  # DeepSpeed swapped the params for its flat fp32 partitions: build the state now
            _install_group_reductions(engine, opt)
            stage = engine.zero_optimization_stage()
            how = f"on DeepSpeed ZeRO-{stage}'s flat fp32 partitions (sharding='none')"
            # summary() then reports DeepSpeed's partitioning, not the 'none' layout shardopt runs on each partition
            opt.partitioned_by = ExternalPartitioning(
                label=f"ds-zero{stage}",
                description=f"DeepSpeed ZeRO-{stage} partitions the state; shardopt steps each rank's flat partition",
                group=_dp_group(engine),
            )
        if engine.zero_optimization_stage() == 3:
            _load_universal_stage3(engine.optimizer, opt)
        else:
            _load_universal_stage12(engine.optimizer, opt)
        if engine.zero_cpu_offload():
            how += " (offloaded to the CPU: C++ CPU kernels)"
    else:
        opt.layout
        if engine.optimizer is opt and engine.bfloat16_enabled():
            clip = engine.gradient_clipping()
            if clip and clip > 0 and opt.grad_clip_norm is None:
                opt.grad_clip_norm = clip  # the engine clips only fp32 models itself
        # DeepSpeed saves one copy of a stage-0 optimizer's state; gather a sharded one into it.
        opt.state_dict = types.MethodType(_stage0_state_dict, opt)
        opt.load_state_dict = types.MethodType(_stage0_load_state_dict, opt)
        how = f"at DeepSpeed stage 0 with shardopt layout {opt.layout.name!r}"
    if engine.global_rank == 0:
        _ds_logger().info(f"shardopt: {type(opt).__name__} runs {how}")


def install() -> None:
    """Teach DeepSpeed's engine the ``shardopt.*`` optimizer types. Safe to call more than once."""
    try:
        from deepspeed.runtime import config as ds_config
        from deepspeed.runtime import engine as ds_engine
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"shardopt.deepspeed needs DeepSpeed (pip install deepspeed): {e}") from e

    Config = ds_config.DeepSpeedConfig
    Engine = ds_engine.DeepSpeedEngine

    if not getattr(Config._initialize_params, _MARK, False):
        orig_init_params = Config._initialize_params

        def _initialize_params(self, param_dict):
            opt = param_dict.get("optimizer")
            self._shardopt = None
            if isinstance(opt, dict) and is_shardopt_type(opt.get("type")):
                resolved = resolve(opt["type"], opt.get("params"), _zero_stage_of(param_dict))
                # DeepSpeed lower-cases its own names only; keep ours canonical.
                param_dict = dict(param_dict)
                param_dict["optimizer"] = dict(opt, type=resolved.entry.name)
                self._shardopt = resolved
            return orig_init_params(self, param_dict)

        setattr(_initialize_params, _MARK, True)
        Config._initialize_params = _initialize_params

    if not getattr(Engine._is_supported_optimizer, _MARK, False):
        orig_supported = Engine._is_supported_optimizer

        def _is_supported_optimizer(self, optimizer_name):
            if is_shardopt_type(optimizer_name):
                entry_for(optimizer_name)  # ValueError listing the valid names
                return True
            return orig_supported(self, optimizer_name)

        setattr(_is_supported_optimizer, _MARK, True)
        Engine._is_supported_optimizer = _is_supported_optimizer

    if not getattr(Engine._configure_basic_optimizer, _MARK, False):
        orig_basic = Engine._configure_basic_optimizer

        def _configure_basic_optimizer(self, model_parameters):
            resolved = getattr(self._config, "_shardopt", None)
            if resolved is None:
                return orig_basic(self, model_parameters)
            return build_optimizer(self, resolved, model_parameters)

        setattr(_configure_basic_optimizer, _MARK, True)
        Engine._configure_basic_optimizer = _configure_basic_optimizer

    if not getattr(ds_engine.is_zero_supported_optimizer, _MARK, False):
        orig_zero_supported = ds_engine.is_zero_supported_optimizer

        def is_zero_supported_optimizer(optimizer):
            # Lion/AdamW run elementwise on DeepSpeed's flat partitions; Muon is refused before this.
            return isinstance(optimizer, ShardedOptimizer) or orig_zero_supported(optimizer)

        setattr(is_zero_supported_optimizer, _MARK, True)
        ds_engine.is_zero_supported_optimizer = is_zero_supported_optimizer

    if not getattr(Engine._do_optimizer_sanity_check, _MARK, False):
        orig_sanity = Engine._do_optimizer_sanity_check

        def _do_optimizer_sanity_check(self, basic_optimizer):
            if not isinstance(basic_optimizer, ShardedOptimizer):
                return orig_sanity(self, basic_optimizer)
            _check_fits_zero(self, basic_optimizer)
            if not self.zero_optimization() and self.bfloat16_enabled():
                return None  # shardopt keeps (and shards) the fp32 master copy itself
            return orig_sanity(self, basic_optimizer)

        setattr(_do_optimizer_sanity_check, _MARK, True)
        Engine._do_optimizer_sanity_check = _do_optimizer_sanity_check

    if not getattr(Engine._configure_optimizer, _MARK, False):
        orig_configure = Engine._configure_optimizer

        def _configure_optimizer(self, client_optimizer, model_parameters):
            ours = isinstance(client_optimizer, ShardedOptimizer) or getattr(self._config, "_shardopt", None)
            if ours and self.zero_use_cpu_optimizer() and self.zero_force_ds_cpu_optimizer():
                # DeepSpeed refuses client optimizers under offload unless told otherwise; ours has CPU kernels
                self._config.zero_force_ds_cpu_optimizer = False
                if self.global_rank == 0:
                    _ds_logger().warning(
                        "shardopt: set zero_force_ds_cpu_optimizer=false: the shardopt optimizer updates the "
                        "offloaded partitions with its own C++ CPU kernels"
                    )
            orig_configure(self, client_optimizer, model_parameters)
            _after_configure_optimizer(self)

        setattr(_configure_optimizer, _MARK, True)
        Engine._configure_optimizer = _configure_optimizer


__all__ = ["install", "resolve", "build_optimizer", "OPTIMIZERS", "valid_names", "config_keys"]
