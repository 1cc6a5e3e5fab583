"""``shardopt plan``: memory, communication and Newton-Schulz load per rank, before the run.

    shardopt plan --model llama-70b --optimizer muon --layout hsdp:*x8 --world-size 64,512,4096
    shardopt plan --model path/to/config.json --layout zero1 --world-size 8 --json plan.json
    shardopt plan --model mypkg.models:build --layout fsdp2 --world-size 1,2,4,8 --plot plan.png

The figures for shardopt's own layouts are not a formula: the model's
parameter list goes through the same planning functions the layouts run on
(``sharding.plan.plan_zero1`` / ``plan_fsdp2``: buckets, ``lpt_assign``,
``fill_segments``, ``Shard(0)`` row chunks), and the per-rank sums are taken
over what they return. Bytes on the wire are counted the way
``shardopt.sharding.comm`` counts them (all-gather: output bytes,
reduce-scatter: input bytes, all-to-all: bytes sent to other ranks,
all-reduce: the tensor's bytes). The DeepSpeed rows follow DeepSpeed 0.19.8's
partitioning rules. Collectives that DDP, FSDP2 or DeepSpeed issue themselves
are listed separately, under their name. Only the step time is an estimate.

Tensor parallelism (``--tp N``) is one more mesh dimension: every tensor's
piece on every rank comes from ``sharding.plan.local_runs`` on the mesh
(replicas, shards, tp), as ``DTensorLayout`` computes it. State precision
(``--state-dtype``, the optimizers' ``state_dtype``) goes through
:func:`state_element_bytes`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import CommandError

OPTIMIZERS = ("lion", "adamw", "muon")
LAYOUT_HELP = "zero1 | fsdp2 | hsdp:RxS | deepspeed-zero1 | deepspeed-zero2 | deepspeed-zero3"
DTYPES = ("fp32", "bf16", "fp16")
MAX_WORLD = 65536
DEFAULT_LINK_GBPS = 400.0  # one 400 Gb/s NIC per GPU (InfiniBand NDR)


@dataclass(frozen=True)
class GPU:
    name: str
    hbm_bytes_per_s: float  # memory bandwidth, vendor datasheet
    bf16_flops: float  # dense bf16 tensor-core FLOP/s, vendor datasheet (no sparsity)


GPUS = {
    "h100": GPU("NVIDIA H100 SXM", 3.35e12, 989e12),
    "h200": GPU("NVIDIA H200 SXM", 4.8e12, 989e12),
    "a100": GPU("NVIDIA A100 80GB SXM", 2.039e12, 312e12),
}

# DeepSpeed 0.19.8 (runtime/zero/stage_1_and_2.py, stage3.py, partition_parameters.py)
DS_NCCL_START_ALIGNMENT = 2  # stage 1/2 pads each flat group to a multiple of this x W elements
DS_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller params stay whole
DS_SUB_GROUP_SIZE = 1_000_000_000  # stage 3 sub_group_size: elements per optimizer step call


# ---------------------------------------------------------------------------- the model's parameters
@dataclass
class Tensor:
    """One parameter as the optimizer sees it."""

    name: str
    shape: tuple
    dtype: object  # torch.dtype
    algorithm: str  # lion | adamw | muon
    group: int
    tp: str = "replicate"  # under --tp: colwise | colwise_bias | rowwise | replicate
    state_dtype: str = "fp32"  # the group's state precision (shardopt.kernels.state_precision)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def _torch_dtype(name):
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown parameter dtype {name!r}; use one of {', '.join(DTYPES)}")
    return table[name]


def _dtype_name(d) -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(d), str(d))


def load_model(spec):
    """(label, nn.Module on the meta device) for a preset, a HF config.json (or its folder) or ``module:function``."""
    import torch

    from ._presets import PRESETS

    if isinstance(spec, torch.nn.Module):
        return type(spec).__name__, spec
    if spec in PRESETS:
        return f"{spec} ({PRESETS[spec][0]})", PRESETS[spec][1]()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"--model {spec}: no such file")
        return spec, _hf_model(path)
    if ":" in spec:
        mod_name, fn_name = spec.split(":", 1)
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--model {spec}: cannot import {fn_name} from {mod_name} ({e})") from e
        with torch.device("meta"):
            model = fn()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"--model {spec} returned {type(model).__name__}, not an nn.Module")
        return spec, model
    raise ValueError(
        f"unknown model {spec!r}: use a preset ({', '.join(PRESETS)}), a Hugging Face config.json "
        "(or the folder holding it), or module:function returning an nn.Module"
    )


def _hf_model(path: Path):
    """The model a Hugging Face ``config.json`` describes, on the meta device: shapes only, no weights."""
    import torch

    try:
        import transformers
    except ImportError as e:
        raise ValueError(f"--model {path} needs transformers (pip install transformers): {e}") from e
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {path}: cannot read the config ({e})") from e
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ValueError(f"--model {path} has no model_type: it is not a Hugging Face config.json")
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


# The default tensor-parallel plan: nn.Linear modules by their name, as torchtitan and Megatron cut a
# transformer (q/k/v, the MLP's up/gate projections column-parallel; the output projections row-parallel).
TP_COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "wq", "wk", "wv", "w1", "w3", "qkv", "fc",
              "fc1", "c_fc", "query", "key", "value", "query_key_value")
TP_ROWWISE = ("o_proj", "down_proj", "wo", "w2", "proj", "fc_out", "fc2", "c_proj", "out_proj")


def tp_roles(model, tp_plan=None) -> dict:
    """Parameter name -> its tensor-parallel role: ``colwise`` (an nn.Linear weight cut by rows),
    ``colwise_bias``, ``rowwise`` (cut by columns; its bias stays whole) or ``replicate``.

    ``tp_plan`` maps module leaf names to ``"colwise"`` / ``"rowwise"`` (what ``parallelize_module``
    is given); by default :data:`TP_COLWISE` / :data:`TP_ROWWISE`. Only nn.Linear modules are cut."""
    import torch

    if tp_plan is None:
        tp_plan = {**{n: "colwise" for n in TP_COLWISE}, **{n: "rowwise" for n in TP_ROWWISE}}
    for k, v in tp_plan.items():
        if v not in ("colwise", "rowwise"):
            raise ValueError(f"tp_plan[{k!r}] = {v!r}: use 'colwise' or 'rowwise'")
    roles = {}
    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        kind = tp_plan.get(mname.rsplit(".", 1)[-1])
        if kind is None:
            continue
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if kind == "colwise":
                roles[full] = "colwise" if pname == "weight" else "colwise_bias"
            else:
                roles[full] = "rowwise" if pname == "weight" else "replicate"
    return roles


def optimizer_tensors(model, optimizer: str, param_dtype=None, muon_aux: str = "adamw", tp_plan=None,
                      state_dtype: str = "fp32") -> list[Tensor]:
    """The optimizer's parameter list, in its order: one group, or Muon's split by ``muon_param_groups``;
    each with its role under tensor parallelism (:func:`tp_roles`)."""
    from ..optim import muon_param_groups

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    dt = _torch_dtype(param_dtype)
    if optimizer == "muon":
        groups = muon_param_groups(model, aux_algorithm=muon_aux)
    else:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named], "algorithm": optimizer}]
    roles = tp_roles(model, tp_plan)
    out = []
    for gi, g in enumerate(groups):
        for name, p in zip(g["param_names"], g["params"]):
            out.append(Tensor(name, tuple(p.shape), dt or p.dtype, g["algorithm"], gi, roles.get(name, "replicate"),
                              state_dtype))
    if not out:
        raise ValueError("the model has no trainable parameters")
    return out


# ---------------------------------------------------------------------------- bytes per element
def state_element_bytes(algorithm: str, state_dtype: str = "fp32", group: dict | None = None,
                        shape=None) -> float:
    """Optimizer-state bytes per owned element: the algorithm's state tensors, each in ``state_dtype``
    (4 bytes for fp32, 2 for bf16; see :data:`shardopt.kernels.state_precision.FORMATS`).

    int8 depends on the parameter: one byte per element plus one fp32 scale per block (``1 + 4/B``, ``B``
    the block :func:`~shardopt.kernels.state_precision.int8_block` gives ``shape``: 256, or fewer for narrow
    rows), fp32's 4 bytes for the shapes it rejects (the optimizers keep their state fp32)."""
    from ..kernels import state_precision
    from ..optim.base import ALGORITHMS

    check_state_dtype(state_dtype)
    algo = ALGORITHMS[algorithm]
    keys = len(algo.state_keys(group if group is not None else algo.defaults))
    if state_dtype == "int8":
        if shape is None:
            raise ValueError("int8 optimizer-state bytes depend on the parameter's shape: pass shape= "
                             "(parameters that int8_eligible rejects keep fp32 state)")
        b = state_precision.int8_block(shape)
        if not b:
            return int(state_precision.FORMATS["fp32"].element_bytes * keys)
        return (1.0 + 4.0 / b) * keys
    return int(state_precision.FORMATS[state_dtype].element_bytes * keys)


# per-element weights are summed in units of 1/UNIT byte (fp64): int8 state is 1 + 4/B bytes per element
# (B = 256 gives 65/64; narrower blocks give fractions no power of two holds), a whole number of bytes
# on the pieces the layouts cut (whole blocks), rounded back at the end
UNIT = 64


def _units(nbytes) -> float:
    return float(nbytes) * UNIT


def _int8_tensor(t: Tensor, tp: int = 1) -> bool:
    """Whether the optimizer gives ``t`` int8 state (its group asks and its shape holds whole blocks in the
    layout). Under tensor parallelism a column- or row-parallel weight is not ``Shard(0)``-only on the mesh,
    and DTensorLayout keeps its state fp32."""
    from ..kernels import state_precision

    return (t.state_dtype == "int8" and state_precision.int8_eligible(t.shape)
            and (tp == 1 or t.tp == "replicate"))


def _partition_state_bytes(algorithm: str, state_dtype: str, numel):
    """State bytes of a DeepSpeed flat partition of ``numel`` elements (numpy array or int): under int8, a
    partition of at least INT8_MIN_NUMEL elements gets codes and one scale per 256 of its own elements
    (the last block may be short), a smaller one fp32 state."""
    import numpy as np

    from ..kernels import state_precision as sp

    if state_dtype != "int8":
        return numel * state_element_bytes(algorithm, state_dtype)
    fp32 = state_element_bytes(algorithm, "fp32")
    keys = fp32 // 4
    n = np.asarray(numel, dtype=np.int64)
    q8 = keys * (n + 4 * (-(-n // sp.BLOCK)))
    out = np.where(n >= sp.INT8_MIN_NUMEL, q8, n * fp32)
    return out if np.ndim(numel) else int(out)


def check_state_dtype(state_dtype: str) -> None:
    """A ValueError naming the valid choices, or one saying the format is not available yet."""
    from ..kernels import state_precision

    if state_dtype not in state_precision.FORMATS:
        raise ValueError(f"unknown state dtype {state_dtype!r}; use one of {', '.join(state_precision.STATE_DTYPES)}")
    if not state_precision.FORMATS[state_dtype].available:
        ok = ", ".join(k for k, f in state_precision.FORMATS.items() if f.available)
        raise ValueError(f"state dtype {state_dtype!r} is not available yet in the optimizers; use one of {ok}")


def master_element_bytes(param_dtype, master_weights: bool = True) -> int:
    """The fp32 master copy that shardopt keeps, sharded like the state, of a bf16/fp16 parameter."""
    from ..optim.base import LOW_PRECISION

    return 4 if master_weights and param_dtype in LOW_PRECISION else 0


def update_traffic_bytes(algorithm: str, param_bytes: int, state_bytes: float, master_bytes: int) -> float:
    """Memory traffic of the fused update per owned element (for the time estimate).

    Read the gradient, read and write the weights updated (the fp32 master if
    any, then write the parameter) and the state (int8 state: its codes and
    scales); Muon also writes its Newton-Schulz input and reads its output back (fp32)."""
    work = master_bytes or param_bytes
    traffic = param_bytes + 2 * work + 2 * state_bytes + (param_bytes if master_bytes else 0)
    if algorithm == "muon":
        traffic += 2 * 4
    return traffic


# ---------------------------------------------------------------------------- per world size
@dataclass
class Collective:
    op: str  # as shardopt.sharding.comm.COUNTERS names it
    per_rank: object  # numpy array: bytes per step on each rank
    by: str  # "shardopt", or the framework that issues it ("DDP", "FSDP2", "DeepSpeed")
    what: str
    calls: int = 1  # collectives of this kind per step
    in_step: bool = True  # inside optimizer.step(): counted in the step-time estimate


@dataclass
class WorldPlan:
    world: int
    layout: str  # what opt.layout.name reports (DeepSpeed rows: "deepspeed-zeroN")
    detail: str
    params: object  # numpy arrays of bytes per rank ...
    grads: object
    master: object
    state: object
    update_bytes: object  # ... and the estimate's memory traffic per rank
    ns_flops: object  # Newton-Schulz FLOPs per rank and step
    ns_owner: dict = field(default_factory=dict)  # Muon matrix -> owner rank in its shard group
    collectives: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    replicas: int = 1  # HSDP: the shard group is world // replicas ranks
    buffers: object = None  # bytes per rank: the largest communication buffers a step allocates (transient)

    def comm(self, op: str, by: str = "shardopt"):
        """Bytes per rank and step of ``op`` issued by ``by`` (numpy array)."""
        return sum((c.per_rank for c in self.collectives if c.op == op and c.by == by), 0 * self.ns_flops)

    def comm_total(self, in_step: bool):
        """Bytes per rank and step of the collectives inside optimizer.step() (or outside it)."""
        return sum((c.per_rank for c in self.collectives if c.in_step == in_step), 0 * self.ns_flops)

    @property
    def optimizer_bytes(self):
        """What ``opt.state_bytes()`` reports on each rank: the state plus shardopt's master copy."""
        return self.state + self.master if self.layout.startswith(("zero1", "fsdp2", "none")) else self.state

    @property
    def ns_imbalance(self) -> float | None:
        mean = float(self.ns_flops.mean())
        return float(self.ns_flops.max()) / mean if mean else None

    @property
    def idle_ranks(self) -> int:
        return int((self.ns_flops == 0).sum()) if self.ns_flops.any() else 0

    def estimate(self, gpu: GPU, link_gbps: float) -> dict:
        """Estimated optimizer-step seconds on the slowest rank (an estimate, not a measurement)."""
        link = link_gbps * 1e9 / 8
        comm = self.comm_total(True)
        elem = self.update_bytes / gpu.hbm_bytes_per_s
        ns = self.ns_flops / gpu.bf16_flops
        wire = comm / link
        total = elem + ns + wire
        r = int(total.argmax())
        return {"seconds": float(total[r]), "elementwise_s": float(elem[r]), "ns_s": float(ns[r]),
                "comm_s": float(wire[r]), "rank": r}


def _arrays(tensors, tp: int = 1):
    """Per tensor: elements, parameter bytes, the weights (state, master, update traffic per element, in
    1/:data:`UNIT` bytes), whether Muon owns it whole, its Newton-Schulz cost, and its ZeRO-1 cut
    granularity (256 for int8 state, else 1)."""
    import numpy as np

    from ..functional import ns_flops
    from ..kernels import state_precision

    numel = np.array([t.numel for t in tensors], dtype=np.int64)
    pbytes = np.array([t.dtype.itemsize for t in tensors], dtype=np.int64)
    q8 = [_int8_tensor(t, tp) for t in tensors]
    sb = [state_element_bytes(t.algorithm, t.state_dtype if q or t.state_dtype != "int8" else "fp32",
                              shape=t.shape) for t, q in zip(tensors, q8)]
    mb = [master_element_bytes(t.dtype) for t in tensors]
    traffic = [update_traffic_bytes(t.algorithm, t.dtype.itemsize, s, m) for t, s, m in zip(tensors, sb, mb)]
    whole = [t.algorithm == "muon" for t in tensors]
    costs = [ns_flops(t.shape) if w else 0 for t, w in zip(tensors, whole)]
    # columns summed per rank over owned elements: state, master, update traffic
    weights = np.array([[_units(a), _units(b), _units(c)] for a, b, c in zip(sb, mb, traffic)],
                       dtype=np.float64).reshape(len(tensors), 3)
    blocks = [state_precision.int8_block(t.shape) if q else 1 for t, q in zip(tensors, q8)]
    return numel, pbytes, weights, whole, costs, blocks


def _bytes_of(units):
    """Whole bytes from sums in 1/UNIT bytes (exact: int8 pieces hold whole blocks)."""
    import numpy as np

    b = np.asarray(units, dtype=np.float64) / UNIT
    r = np.rint(b)
    if (np.abs(b - r) > 1e-6 * np.maximum(1.0, np.abs(b))).any():
        raise AssertionError("a rank's int8 state does not hold whole blocks")
    return r.astype(np.int64)


def _stats_all_reduce(world: int, n_params: int, *, what="", by="shardopt", calls=1):
    import numpy as np

    from ..sharding import comm

    per = comm.STATS_DTYPE.itemsize * comm.stats_numel(n_params) * calls
    return Collective("all_reduce", np.full(world, per, np.int64), by,
                      what or f"step stats: grad norm, non-finite count and {n_params} has-gradient counts",
                      calls=calls)


def _ns_table(tensors, owner, costs, ranks):
    import numpy as np

    flops = np.zeros(ranks, dtype=np.int64)
    table = {}
    for t, o, c in zip(tensors, owner, costs):
        if o is not None:
            flops[o] += c
            table[t.name] = o
    return flops, table


def plan_zero1_world(tensors, world: int, *, reduce_gradients: bool = False, grads_by: str = "DDP") -> WorldPlan:
    """shardopt's ZeRO-1 (``sharding='zero1'``) on ``world`` ranks; one process is the local layout."""
    import numpy as np

    from ..sharding import zero1
    from ..sharding.plan import plan_zero1

    numel, pbytes, weights, whole, costs, blocks = _arrays(tensors)
    n_bytes = int((numel * pbytes).sum())
    if world == 1:
        owned = _bytes_of((numel[:, None] * weights).sum(0))
        ns, table = _ns_table(tensors, [0 if w else None for w in whole], costs, 1)
        one = np.ones(1, np.int64)
        return WorldPlan(1, "none", "one process: every state tensor whole and local", n_bytes * one, n_bytes * one,
                         owned[1] * one, owned[0] * one, owned[2] * one, ns, table)
    plan = plan_zero1([t.numel for t in tensors], [t.dtype for t in tensors], whole, [float(c) for c in costs],
                      world, bucket_elements=zero1.DEFAULT_BUCKET_ELEMENTS, align_bytes=zero1.ALIGN_BYTES,
                      blocks=blocks)
    owned = np.zeros((world, weights.shape[1]), dtype=np.float64)
    gather = np.int64(0)
    for st in plan.streams:
        sp = st.plan
        for k, o in enumerate(sp.owners):
            if o is not None:
                owned[o] += numel[st.indices[k]] * weights[st.indices[k]]
        owned += _split_window_sums(sp, [weights[i] for i in st.indices])
        gather += world * sp.segment * st.dtype.itemsize
    owned = _bytes_of(owned)
    ns, table = _ns_table(tensors, plan.owner, costs, world)
    full = np.full(world, n_bytes, np.int64)
    # finish(): a send segment and the W-segment receive buffer per bucket; prepare_grads() the same in grad dtype
    buf = max(((world + 1) * b.plan.segment * b.dtype.itemsize for b in plan.buckets), default=0)
    notes = []
    if gather > 1.1 * n_bytes:
        notes.append(f"the all-gather moves {gather / n_bytes:.1f}x the parameter bytes: the owners' Muon matrices, "
                     "balanced by NS cost, hold more elements on some ranks than the parameters / W, and every "
                     "segment is as long as the longest (fsdp2 and hsdp do not pad)")
    colls = [Collective("all_gather", np.full(world, gather, np.int64), "shardopt",
                        "updated parameters, one all-gather per bucket",
                        calls=sum(1 for b in plan.buckets if b.plan.segment))]
    if reduce_gradients:
        colls.append(Collective("reduce_scatter", np.full(world, gather, np.int64), "shardopt",
                                "gradients into the owned segments (reduce_gradients=True)", calls=len(plan.buckets)))
    else:
        colls.append(Collective("all_reduce", full.copy(), grads_by,
                                f"gradients, issued by {grads_by} in backward (not by shardopt)", in_step=False))
    colls.append(_stats_all_reduce(world, len(tensors)))
    # the all-gather's packing: each rank copies its segment in and everything back out
    copies = 2 * full + (2 * full if reduce_gradients else 0)
    n_buckets = len(plan.buckets)
    return WorldPlan(world, "zero1", f"{n_buckets} bucket{'s' * (n_buckets != 1)}, segments of "
                     f"{zero1.ALIGN_BYTES}-byte aligned elements", full, full.copy(), owned[:, 1], owned[:, 0],
                     owned[:, 2] + copies, ns, table, colls, notes, buffers=np.full(world, buf, np.int64))


def _split_window_sums(sp, weights):
    """Per rank, the weighted element count of its window of the bucket's splittable stream (a window
    edge inside an item with int8 state moves down to a multiple of its blocks, as ``split_window``)."""
    import numpy as np

    split = [k for k, o in enumerate(sp.owners) if o is None and sp.numels[k] > 0]
    K = len(weights[0]) if weights else 0
    if not split:
        return np.zeros((sp.world, K), dtype=np.float64)
    starts = np.array([sp.split_start[k] for k in split], dtype=np.int64)
    sizes = np.array([sp.numels[k] for k in split], dtype=np.int64)
    w = np.stack([weights[k] for k in split])
    cum = np.concatenate([np.zeros((1, K), np.int64), np.cumsum(sizes[:, None] * w, axis=0)])
    total = int(sizes.sum())
    base = np.array(sp.split_base, dtype=np.int64)
    lo = np.minimum(base, total)
    hi = np.minimum(base + sp.segment - sp.slack - np.array(sp.whole_used, dtype=np.int64), total)
    if sp.blocks:
        blk = np.array([sp.blocks[k] for k in split], dtype=np.int64)

        def snap(x):
            j = np.searchsorted(starts, x, side="right") - 1
            jj = np.clip(j, 0, len(split) - 1)
            a, b = starts[jj], blk[jj]
            inside = (j >= 0) & (b > 1) & (a < x) & (x < a + sizes[jj])
            return np.where(inside, a + (x - a) // b * b, x)

        lo, hi = snap(lo), snap(hi)
        hi = np.maximum(lo, hi)

    def upto(x):  # weighted count of stream elements before x
        j = np.clip(np.searchsorted(starts, x, side="right") - 1, 0, len(split) - 1)
        return cum[j] + (np.minimum(x, starts[j] + sizes[j]) - starts[j])[:, None] * w[j]

    return upto(hi) - upto(lo)


def _mesh_splits(t: Tensor, tp: int) -> list:
    """How FSDP2 (over mesh dim 1) and TP (dim 2) cut ``t`` on the mesh (replicas, shards, tp): a
    column-parallel weight gets ``(_StridedShard(0, sf=tp), Shard(0))``, a row-parallel one
    ``(Shard(0), Shard(1))``, the rest ``Shard(0)`` on the dp dims (replicated over tp)."""
    from ..sharding.plan import Split

    if not t.shape:
        return []
    if tp > 1 and t.tp in ("colwise", "colwise_bias"):
        return [Split(0, (1,), tp), Split(0, (2,))]
    if tp > 1 and t.tp == "rowwise":
        return [Split(0, (1,)), Split(1, (2,))]
    return [Split(0, (1,))]


def plan_fsdp2_world(tensors, world: int, *, replicas: int = 1, comm_dtype=None, tp: int = 1) -> WorldPlan:
    """FSDP2 (``fully_shard``) over ``world // (replicas * tp)`` shard ranks, replicated ``replicas``
    times (HSDP), with tensor parallelism over ``tp`` ranks (``parallelize_module`` by
    :func:`tp_roles`). Each rank's piece of every tensor comes from ``sharding.plan.local_runs`` on
    the mesh (replicas, shards, tp), the Muon owners from ``plan_mesh`` over the layout's group,
    the all-to-all calls from ``ns_chunks``: the functions ``DTensorLayout`` runs on."""
    import numpy as np

    from ..sharding.plan import group_coords, is_canonical, local_runs, mesh_index, ns_chunks, plan_mesh, runs_len

    shards = world // (replicas * tp)
    mesh = (replicas, shards, tp)
    numel, pbytes, weights, whole, costs, _ = _arrays(tensors, tp)
    splits = [_mesh_splits(t, tp) for t in tensors]
    group_dims = tuple(sorted({d for sps in splits for sp in sps for d in sp.mesh_dims}))
    coords = group_coords(mesh, group_dims, (0, 0, 0))  # group index -> coordinate (replica 0)
    G = len(coords)
    cache: dict = {}

    def local(i):
        """(elements held, canonical copy?, FSDP2's padded all-gather elements) per group index."""
        key = (tensors[i].shape, tuple(splits[i]))
        got = cache.get(key)
        if got is None:
            shape = tensors[i].shape
            tp_only = [sp for sp in splits[i] if 2 in sp.mesh_dims]
            n, can, pad = [], [], []
            for c in coords:
                n.append(math.prod(runs_len(x) for x in local_runs(shape, splits[i], c, mesh)))
                can.append(is_canonical(c, splits[i], group_dims))
                if shape:  # FSDP2 gathers the TP-local tensor padded to whole row chunks
                    tl = [runs_len(x) for x in local_runs(shape, tp_only, c, mesh)]
                    pad.append(-(-tl[0] // shards) * shards * math.prod(tl[1:]) if tl[0] else 0)
                else:
                    pad.append(1)
            got = (np.array(n, np.int64), np.array(can, bool), np.array(pad, np.int64))
            cache[key] = got
        return got

    plan = plan_mesh(whole, [float(c) for c in costs], mesh, group_dims)
    K = weights.shape[1]
    owned = np.zeros((G, K), dtype=np.float64)
    params = np.zeros(G, dtype=np.int64)
    padded = np.zeros(G, dtype=np.int64)
    a2a = np.zeros(G, dtype=np.int64)
    cbytes = comm_dtype.itemsize if comm_dtype is not None else 4
    owned_muon = np.zeros(G, dtype=np.int64)
    idx = np.arange(G)
    for i, t in enumerate(tensors):
        n, can, pad = local(i)
        owned += n[:, None] * weights[i]
        params += n * pbytes[i]
        padded += pad * pbytes[i]
        o = plan.owner[i]
        if o is not None and G > 1:
            # all-to-all #1: each canonical copy to the owner; #2: the owner returns every holder's piece
            a2a += np.where((idx != o) & can, n, 0) * cbytes
            a2a[o] += (int(n.sum()) - int(n[o])) * cbytes
            owned_muon[o] += t.numel
    owned = _bytes_of(owned)
    ns, table = _ns_table(tensors, plan.owner, costs, G)
    # per global rank (row-major over (replicas, shards, tp)): its group index's figures
    expand = np.array([mesh_index((g // (shards * tp), g // tp % shards, g % tp), group_dims, mesh)
                       for g in range(world)], dtype=np.int64)
    colls = []
    if G > 1 and table:
        mats = [i for i in range(len(tensors)) if plan.owner[i] is not None]
        chunks = ns_chunks(mats, plan.owner, [t.shape for t in tensors], True)
        colls.append(Collective("all_to_all", a2a[expand], "shardopt",
                                "Muon gather step: pieces to each matrix's owner and back, in chunks",
                                calls=2 * len(chunks)))
    colls.append(_stats_all_reduce(world, len(tensors)))
    colls.append(Collective("all_gather", 2 * padded[expand], "FSDP2",
                            "parameters for forward and backward (FSDP2's, padded to whole row chunks)",
                            calls=2, in_step=False))
    colls.append(Collective("reduce_scatter", padded[expand], "FSDP2",
                            "gradients, in backward (FSDP2's)", in_step=False))
    if replicas > 1:
        colls.append(Collective("all_reduce", params[expand], "FSDP2",
                                f"gradient shards across the {replicas} replicas (HSDP, FSDP2's)", in_step=False))
    notes = []
    if tp > 1:
        detail = (f"HSDP x TP: {replicas} replicas x {shards} shards x {tp} TP ranks" if replicas > 1 else
                  f"FSDP2 x TP: {shards} shards x {tp} TP ranks") + \
            f", Muon owners over the {G:,} ranks of shards x TP"
        cut = sum(1 for t in tensors if t.tp != "replicate")
        notes.append(f"TP cuts {cut} of {len(tensors)} tensors (nn.Linear by name: column-parallel "
                     f"{'/'.join(TP_COLWISE[:5])}..., row-parallel {'/'.join(TP_ROWWISE[:4])}...); TP's "
                     "activation all-reduces depend on the batch and are not counted")
    else:
        detail = (f"HSDP: {replicas} replicas x {shards} shards" if replicas > 1 else f"{shards} shards") + \
            ", Shard(0) chunks of ceil(rows / shards) rows"
    # the owner receives its matrices' pieces and assembles them in fp32
    buffers = (owned_muon * (cbytes + 4))[expand]
    return WorldPlan(world, "fsdp2", detail, params[expand], params[expand], owned[:, 1][expand],
                     owned[:, 0][expand], owned[:, 2][expand], ns[expand], table, colls, notes,
                     replicas=world // G, buffers=buffers)


def plan_deepspeed_world(tensors, world: int, stage: int) -> WorldPlan:
    """Lion/AdamW inside DeepSpeed ZeRO-``stage``: shardopt runs on DeepSpeed's flat fp32 partitions.

    Partition sizes follow DeepSpeed 0.19.8: stage 1/2 pad the one flat group to
    a multiple of 2 x W elements and cut it into W equal parts; stage 3 pads each
    parameter to a multiple of W and gives every rank ceil(numel / W) of it."""
    import numpy as np

    numel = np.array([t.numel for t in tensors], dtype=np.int64)
    dts = {t.dtype for t in tensors}
    if len(dts) != 1:
        raise ValueError(f"DeepSpeed needs one dtype per parameter group; the model mixes {sorted(map(str, dts))}")
    p = next(iter(dts)).itemsize
    algo, sd = tensors[0].algorithm, tensors[0].state_dtype

    def state_of(part):  # DeepSpeed's flat fp32 partition holds its own int8 blocks
        return _partition_state_bytes(algo, sd, part)

    def traffic_of(part):  # fp32 partition, then the bf16 copy
        return part * (update_traffic_bytes(algo, 4, 0, 0) + p) + 2 * state_of(part)
    ones = np.ones(world, np.int64)
    n = int(numel.sum())
    if stage in (1, 2):
        flat = -(-n // (DS_NCCL_START_ALIGNMENT * world)) * DS_NCCL_START_ALIGNMENT * world
        part = flat // world
        grads = n * p if stage == 1 else part * p
        colls = [
            Collective("reduce_scatter", flat * p * ones, "DeepSpeed", "gradients, in backward (DeepSpeed's)",
                       in_step=False),
            Collective("all_gather", flat * p * ones, "DeepSpeed", "updated partitions (DeepSpeed's, in step)"),
            _stats_all_reduce(world, 1, what="step stats of the one flat partition, over DeepSpeed's group"),
        ]
        detail = f"one flat group of {flat:,} elements (padded to 2 x W), {part:,} per rank"
        return WorldPlan(world, f"deepspeed-zero{stage}", detail, n * p * ones, grads * ones, part * 4 * ones,
                         state_of(part) * ones, traffic_of(part) * ones, 0 * ones, {}, colls)
    parts = -(-numel // world)
    part = int(parts.sum())
    persistent = numel <= DS_PERSISTENCE_THRESHOLD
    sub_groups, acc, sub_parts = 0, 0, []
    for k, x in enumerate(parts.tolist()):  # DeepSpeed's _create_fp16_sub_groups
        acc += x
        if acc >= DS_SUB_GROUP_SIZE or k == len(parts) - 1:
            sub_groups, acc, sub_parts = sub_groups + 1, 0, sub_parts + [acc]
    state = sum(state_of(x) for x in sub_parts)  # one flat fp32 partition per sub-group
    traffic = sum(traffic_of(x) for x in sub_parts)
    gathered = int((parts * world)[~persistent].sum()) * p
    colls = [
        Collective("all_gather", 2 * gathered * ones, "DeepSpeed",
                   "parameters for forward and backward (DeepSpeed's)", calls=2, in_step=False),
        Collective("reduce_scatter", int((parts * world).sum()) * p * ones, "DeepSpeed",
                   "gradients, in backward (DeepSpeed's)", in_step=False),
        _stats_all_reduce(world, 1, calls=sub_groups,
                          what=f"step stats, once per sub-group ({sub_groups}), over DeepSpeed's group"),
    ]
    params = part * p + int(numel[persistent].sum()) * p
    detail = f"every parameter cut into W parts of ceil(numel/W); {sub_groups} optimizer sub-group(s)"
    return WorldPlan(world, "deepspeed-zero3", detail, params * ones, part * p * ones, part * 4 * ones,
                     state * ones, traffic * ones, 0 * ones, {}, colls,
                     [f"parameters under {DS_PERSISTENCE_THRESHOLD:,} elements stay whole on every rank "
                      "(stage3_param_persistence_threshold)"])


def plan_deepspeed_muon_world(tensors, world: int, stage: int, ns_bytes: int = 2) -> WorldPlan:
    """Muon inside DeepSpeed ZeRO-``stage`` (:mod:`shardopt.sharding.flat`): each param group (the Muon
    matrices, the aux group) is DeepSpeed's flat partition; every matrix is sent to its LPT owner in one
    all-to-all and its Newton-Schulz result comes back in a second one (``ns_bytes`` per element: bf16
    Newton-Schulz results travel in bf16); DeepSpeed all-gathers (ZeRO-1/2) or partitions (ZeRO-3) the
    parameters. At ZeRO-1/2 the gradient buckets are reduce-scattered by an all-to-all (shardopt's)."""
    import numpy as np

    from ..functional import ns_flops
    from ..sharding.plan import contiguous_pieces, lpt_assign, per_item_pieces

    dts = {t.dtype for t in tensors}
    if len(dts) != 1:
        raise ValueError(f"DeepSpeed needs one dtype per parameter group; the model mixes {sorted(map(str, dts))}")
    p = next(iter(dts)).itemsize
    ones = np.ones(world, np.int64)
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.group, []).append(t)
    mats = [t for t in tensors if t.algorithm == "muon"]
    owners = dict(zip((t.name for t in mats), lpt_assign([float(ns_flops(t.shape)) for t in mats], world)))
    params = np.zeros(world, np.int64)
    grads = np.zeros(world, np.int64)
    master = np.zeros(world, np.int64)
    state = np.zeros(world, np.int64)
    traffic = np.zeros(world, np.int64)
    a2a = np.zeros(world, np.int64)
    grad_a2a = np.zeros(world, np.int64)
    ds_gather = 0
    for ts in groups.values():
        numels = [t.numel for t in ts]
        n = sum(numels)
        algo, sd = ts[0].algorithm, ts[0].state_dtype
        if stage in (1, 2):
            flat = -(-n // (DS_NCCL_START_ALIGNMENT * world)) * DS_NCCL_START_ALIGNMENT * world
            part = np.full(world, flat // world, np.int64)
            offsets = [0, *np.cumsum(numels)[:-1].tolist()]
            pieces = contiguous_pieces(numels, offsets, flat // world, world)
            params += n * p
            grads += n * p if stage == 1 else part * p
            ds_gather += flat * p
            grad_a2a += (flat - part) * p
        else:
            pieces = per_item_pieces(numels, world)
            part = np.array([sum(pc.numel for pc in pcs) for pcs in pieces], np.int64)
            parts = np.array([-(-x // world) for x in numels], np.int64)
            params += int(parts.sum()) * p
            grads += int(parts.sum()) * p
        master += part * 4
        sbytes = _partition_state_bytes(algo, sd, part)  # the group's flat partition holds its own int8 blocks
        state += sbytes
        traffic += part * (update_traffic_bytes(algo, 4, 0, 0) + p) + 2 * sbytes
        if ts[0].algorithm != "muon":
            continue
        for k, t in enumerate(ts):
            o = owners[t.name]
            held = np.zeros(world, np.int64)
            for r in range(world):
                held[r] = sum(pc.numel for pc in pieces[r] if pc.item == k)
            sent = held * 4
            sent[o] = 0
            a2a += sent
            a2a[o] += (int(held.sum()) - int(held[o])) * ns_bytes
    ns, table = _ns_table(mats, [owners[t.name] for t in mats], [ns_flops(t.shape) for t in mats], world)
    colls = [Collective("all_to_all", a2a, "shardopt", "Muon gather step: each matrix's ranges to its owner and back",
                        calls=2 * len(groups)),
             _stats_all_reduce(world, 1, calls=len(groups),
                               what="step stats, once per flat group stepped, over DeepSpeed's group")]
    if stage in (1, 2):
        colls += [Collective("all_to_all", grad_a2a, "shardopt", "gradient buckets reduce-scattered by an all-to-all "
                             "(in backward; a bucket that straddles partitions stays DeepSpeed's all-reduce)",
                             in_step=False),
                  Collective("all_gather", ds_gather * ones, "DeepSpeed", "updated partitions (DeepSpeed's, in step)")]
        detail = f"{len(groups)} flat groups (Muon matrices, aux), each padded to 2 x W and cut into W parts"
    else:
        total = sum(-(-t.numel // world) * world for t in tensors) * p
        colls += [Collective("all_gather", 2 * total * ones, "DeepSpeed",
                             "parameters for forward and backward (DeepSpeed's)", calls=2, in_step=False),
                  Collective("reduce_scatter", total * ones, "DeepSpeed", "gradients, in backward (DeepSpeed's)",
                             in_step=False)]
        detail = "every parameter cut into W parts of ceil(numel/W); each Muon matrix assembled on its owner"
    return WorldPlan(world, f"deepspeed-zero{stage}", detail, params, grads, master, state, traffic, ns, table, colls)


# ---------------------------------------------------------------------------- the plan
def parse_layout(text: str):
    """(kind, replicas, shards, stage); replicas/shards of ``hsdp:RxS`` may be None for ``*``."""
    if text in ("zero1", "fsdp2"):
        return text, None, None, None
    if text.startswith("deepspeed-zero") and text[-1:] in ("1", "2", "3") and len(text) == len("deepspeed-zero1"):
        return "deepspeed", None, None, int(text[-1])
    if text.startswith("hsdp:"):
        parts = text[5:].lower().split("x")
        try:
            if len(parts) == 2 and not (parts[0] == parts[1] == "*"):
                r, s = (None if x == "*" else int(x) for x in parts)
                if all(v is None or v > 0 for v in (r, s)):
                    return "hsdp", r, s, None
        except ValueError:
            pass
        raise ValueError(f"--layout {text}: use hsdp:RxS with R replicas and S shards per replica, "
                         "one of them may be * (derived from the world size), e.g. hsdp:2x4 or hsdp:*x8")
    raise ValueError(f"unknown layout {text!r}; use one of {LAYOUT_HELP}")


@dataclass
class Plan:
    model: str
    optimizer: str
    layout: str
    param_dtype: str
    tensors: list
    worlds: list
    gpu: GPU
    gpu_key: str
    link_gbps: float
    reduce_gradients: bool = False
    tp: int = 1
    state_dtype: str = "fp32"

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def groups(self) -> list[dict]:
        out = {}
        for t in self.tensors:
            g = out.setdefault(t.group, {"algorithm": t.algorithm, "tensors": 0, "elements": 0})
            g["tensors"] += 1
            g["elements"] += t.numel
        return list(out.values())

    def to_dict(self) -> dict:
        def stat(a):
            return {"max": int(a.max()), "mean": float(a.mean()), "min": int(a.min())}

        worlds = []
        for w in self.worlds:
            est = w.estimate(self.gpu, self.link_gbps)
            worlds.append({
                "world_size": w.world, "layout": w.layout, "detail": w.detail,
                "memory_bytes_per_rank": {k: stat(getattr(w, k)) for k in ("params", "grads", "master", "state")},
                "optimizer_state_bytes_per_rank": stat(w.optimizer_bytes),
                "communication_bytes_per_rank_and_step": [
                    {"op": c.op, "by": c.by, "what": c.what, "calls": c.calls, "in_optimizer_step": c.in_step,
                     **stat(c.per_rank)} for c in w.collectives],
                "newton_schulz": {"flops_per_rank": stat(w.ns_flops), "imbalance": w.ns_imbalance,
                                  "idle_ranks": w.idle_ranks, "matrices": len(w.ns_owner), "owner": w.ns_owner},
                "estimated_step": {**est, "gpu": self.gpu_key, "link_gbps": self.link_gbps, "is_estimate": True},
                "notes": w.notes,
            })
        return {"model": self.model, "parameters": self.n_params, "tensors": len(self.tensors),
                "optimizer": self.optimizer, "layout": self.layout, "param_dtype": self.param_dtype,
                "state_dtype": self.state_dtype,
                "reduce_gradients": self.reduce_gradients, "tp": self.tp, "groups": self.groups(), "worlds": worlds}

    # -- text --------------------------------------------------------------
    def format(self) -> str:
        groups = self.groups()
        if len(groups) == 1:
            opt = f"{self.optimizer}, one group"
        else:
            opt = " + ".join(f"{'aux ' if g['algorithm'] != 'muon' else ''}{g['algorithm']}: {g['tensors']} "
                             f"{'matrices' if g['algorithm'] == 'muon' else 'tensors'} ({_count(g['elements'])})"
                             for g in groups)
        g = self.gpu
        lines = [f"shardopt plan: {self.model}, {_count(self.n_params)} parameters in {len(self.tensors)} tensors, "
                 f"{self.param_dtype}",
                 f"optimizer {opt}",
                 f"layout {self.layout}" + (" with reduce_gradients=True" if self.reduce_gradients else "")
                 + (f", tensor parallel over {self.tp} ranks" if self.tp > 1 else ""),
                 f"step-time estimate: {self.gpu_key} ({g.name}: {g.hbm_bytes_per_s / 1e12:g} TB/s, "
                 f"{g.bf16_flops / 1e12:g} TFLOP/s bf16), {self.link_gbps:g} Gb/s per rank"]
        for w in self.worlds:
            lines += [""] + self._format_world(w)
        if len(self.worlds) > 1:
            lines += [""] + self._format_summary()
        return "\n".join(lines)

    def _format_world(self, w: WorldPlan) -> list[str]:
        out = [f"W = {w.world:,}  ({w.layout}: {w.detail})",
               f"  {'memory per rank':<34}{'max':>12}{'mean':>12}"]
        pd = self.param_dtype
        ds = w.layout.startswith("deepspeed")
        for label, a in ((f"parameters ({pd})", w.params), (f"gradients ({pd})", w.grads),
                         ("master weights (fp32" + (", DeepSpeed's)" if ds else ")"), w.master),
                         (f"optimizer state ({self.state_dtype})", w.state),
                         ("total", w.params + w.grads + w.master + w.state)):
            out.append(f"    {label:<32}{_bytes(a.max()):>12}{_bytes(a.mean()):>12}")
        if w.buffers is not None and w.buffers.any():
            b = w.buffers
            out.append(f"    {'comm buffers (transient)':<32}{_bytes(b.max()):>12}{_bytes(b.mean()):>12}")
        out.append(f"  {'communication per step and rank':<34}{'max':>12}")
        for c in w.collectives:
            calls = f" x{c.calls}" if c.calls > 1 else ""
            out.append(f"    {c.op + calls:<20}{c.by:<14}{_bytes(c.per_rank.max()):>12}   {c.what}")
        if w.ns_owner:
            ns = w.ns_flops
            line = (f"  Muon Newton-Schulz per rank: max {ns.max() / 1e9:,.1f} GFLOP, mean {ns.mean() / 1e9:,.1f}, "
                    f"imbalance {w.ns_imbalance:.3f}")
            out.append(line)
            if w.idle_ranks:
                group = f"a shard group of {w.world // w.replicas:,} ranks" if w.replicas > 1 else f"{w.world:,} ranks"
                out.append(f"    {w.idle_ranks:,} of {w.world:,} ranks run no Newton-Schulz: {len(w.ns_owner)} "
                           f"matrices for {group}")
        est = w.estimate(self.gpu, self.link_gbps)
        out.append(f"  estimated optimizer step: {_secs(est['seconds'])} = {_secs(est['elementwise_s'])} elementwise"
                   f" + {_secs(est['ns_s'])} Newton-Schulz + {_secs(est['comm_s'])} communication  [estimate]")
        out += [f"  note: {n}" for n in w.notes]
        return out

    def _format_summary(self) -> list[str]:
        head = f"{'summary, max per rank':<30}" + "".join(f"{'W=' + format(w.world, ','):>12}" for w in self.worlds)
        rows = [head]

        def row(label, vals):
            rows.append(f"{label:<30}" + "".join(f"{v:>12}" for v in vals))

        row("optimizer state + master", [_bytes((w.state + w.master).max()) for w in self.worlds])
        row("all memory above", [_bytes((w.params + w.grads + w.master + w.state).max()) for w in self.worlds])
        row("comm in optimizer.step", [_bytes(w.comm_total(True).max()) for w in self.worlds])
        row("comm outside it (framework)", [_bytes(w.comm_total(False).max()) for w in self.worlds])
        if any(w.ns_owner for w in self.worlds):
            row("Newton-Schulz imbalance", [f"{w.ns_imbalance:.3f}" if w.ns_imbalance else "-" for w in self.worlds])
            row("ranks without Newton-Schulz", [f"{w.idle_ranks:,}" for w in self.worlds])
        row(f"est. step, {self.gpu_key} [estimate]", [_secs(w.estimate(self.gpu, self.link_gbps)["seconds"])
                                                     for w in self.worlds])
        return rows

    # -- plot --------------------------------------------------------------
    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ws = [w.world for w in self.worlds]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for (label, key), style in zip((("parameters", "params"), ("gradients", "grads"),
                                        ("master weights", "master"), ("optimizer state", "state")),
                                       ("o-", "s--", "^-", "D-")):
            ys = [max(int(getattr(w, key).max()), 1) for w in self.worlds]
            a.plot(ws, ys, style, label=label)
        a.set(xscale="log", yscale="log", xlabel="world size W", ylabel="bytes per rank (max)",
              title="memory per rank")
        kinds = sorted({(c.op, c.by) for w in self.worlds for c in w.collectives})
        for op, by in kinds:
            ys = [max(int(w.comm(op, by).max()), 1) for w in self.worlds]
            b.plot(ws, ys, marker="o", label=f"{op} ({by})")
        b.set(xscale="log", yscale="log", xlabel="world size W", ylabel="bytes per rank and step",
              title="communication per step")
        for ax in (a, b):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"shardopt plan: {self.model}, {self.optimizer}, {self.layout}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _count(n) -> str:
    for unit, f in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return str(int(n))


def _bytes(n) -> str:
    n = float(n)
    for unit, f in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


def _secs(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def plan(model="llama-8b", *, world_sizes=(8,), layout: str = "zero1", optimizer: str = "adamw",
         param_dtype="bf16", muon_aux: str = "adamw", reduce_gradients: bool = False, comm_dtype=None,
         gpu: str = "h100", link_gbps: float = DEFAULT_LINK_GBPS, tp: int = 1, tp_plan=None,
         state_dtype: str = "fp32") -> Plan:
    """Plan a run: per world size, per-rank memory, communication and Newton-Schulz load.

    ``model``: a preset name (``llama-1b``, ``llama-8b``, ``llama-70b``,
    ``llama-405b``, ``gpt2``, ``demo``), a Hugging Face ``config.json`` (or its
    folder), ``"module:function"`` returning an ``nn.Module``, or a module.
    ``param_dtype`` None keeps the module's own dtypes. ``tp`` > 1 adds a tensor-parallel mesh
    dimension of that size to ``fsdp2`` / ``hsdp`` (the world size counts it: W = replicas x
    shards x tp), cutting nn.Linear modules by ``tp_plan`` (leaf name -> "colwise" / "rowwise";
    default :func:`tp_roles`'s Megatron-style names). Returns a :class:`Plan`
    (``.format()``, ``.to_dict()``, ``.plot(path)``; ``.worlds[k]`` holds the
    per-rank numpy arrays). ``state_dtype`` is the optimizers' state precision (``fp32``, ``bf16`` or
    ``int8``: 1 byte per element and one fp32 scale per 256 for the parameters
    :func:`~shardopt.kernels.state_precision.int8_eligible` accepts, fp32 for the others)."""
    kind, rep, shd, stage = parse_layout(layout)
    check_state_dtype(state_dtype)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if gpu not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; use one of {', '.join(GPUS)}")
    if not link_gbps > 0:
        raise ValueError(f"link_gbps must be > 0, got {link_gbps!r}")
    if muon_aux not in ("adamw", "lion"):
        raise ValueError(f"muon_aux must be 'adamw' or 'lion', got {muon_aux!r}")
    if reduce_gradients and kind != "zero1":
        raise ValueError("reduce_gradients applies to the zero1 layout only")
    if not (isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1):
        raise ValueError(f"tp must be a whole number >= 1, got {tp!r}")
    if tp > 1 and kind not in ("fsdp2", "hsdp"):
        raise ValueError(f"tensor parallelism (tp={tp}) applies to the fsdp2 and hsdp layouts (DTensor parameters), "
                         f"not to {layout}")
    if world_sizes is None:
        if kind == "hsdp" and rep and shd:
            world_sizes = (rep * shd * tp,)
        else:
            world_sizes = (8,)
    world_sizes = list(world_sizes)
    for w in world_sizes:
        if not (isinstance(w, int) and 0 < w <= MAX_WORLD):
            raise ValueError(f"world size {w!r}: use integers from 1 to {MAX_WORLD}")
    meshes = []  # (replicas, shards) per world size
    for w in world_sizes:
        if w % tp:
            raise ValueError(f"world size {w} is not a multiple of tp={tp}")
        dp = w // tp
        if kind == "hsdp":
            r = rep if rep else (dp // shd if dp % shd == 0 else 0)
            s = shd if shd else (dp // rep if dp % rep == 0 else 0)
            if not r or not s or r * s != dp:
                raise ValueError(f"--layout {layout} does not fit world size {w}: replicas x shards"
                                 + (f" x tp ({tp})" if tp > 1 else "") + " must equal it")
            meshes.append((r, s))
        else:
            meshes.append((1, dp))
    cdt = _torch_dtype(comm_dtype)
    label, module = load_model(model)
    tensors = optimizer_tensors(module, optimizer, param_dtype, muon_aux, tp_plan, state_dtype)
    worlds = []
    for w, (r, _) in zip(world_sizes, meshes):
        if kind == "zero1":
            worlds.append(plan_zero1_world(tensors, w, reduce_gradients=reduce_gradients))
        elif kind in ("fsdp2", "hsdp"):
            worlds.append(plan_fsdp2_world(tensors, w, replicas=r, comm_dtype=cdt, tp=tp))
        elif optimizer == "muon":
            worlds.append(plan_deepspeed_muon_world(tensors, w, stage))
        else:
            worlds.append(plan_deepspeed_world(tensors, w, stage))
    dts = sorted({_dtype_name(t.dtype) for t in tensors})
    return Plan(label, optimizer if optimizer != "muon" else f"muon (aux {muon_aux})", layout, "/".join(dts),
                tensors, worlds, GPUS[gpu], gpu, float(link_gbps), reduce_gradients, tp, state_dtype)


# ---------------------------------------------------------------------------- command line
def _world_sizes(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected world sizes such as 8 or 8,64,512, got {text!r}") from None
    if not out or any(not 0 < x <= MAX_WORLD for x in out):
        raise argparse.ArgumentTypeError(f"world sizes must lie in 1..{MAX_WORLD}, got {text!r}")
    return out


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ._presets import PRESETS

    presets = "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items())
    p = subparsers.add_parser(
        "plan",
        help="per-rank memory, communication and Newton-Schulz load of a run, from 1 to 4096+ ranks",
        description=(
            "Plan a run before you have the cluster: for each world size, the per-rank bytes of parameters, "
            "gradients, master weights and optimizer state; the bytes each collective sends per step and rank; "
            "Muon's Newton-Schulz FLOPs per rank (max/mean); and an estimated optimizer-step time. The layout "
            "figures come from the planning functions the layouts themselves run (exact, not a formula); the "
            "step time is an estimate."
        ),
        epilog=(
            "Optimizer state is counted in --state-dtype (fp32 by default; bf16 halves it; int8 stores about a "
            "quarter of it for the matrices that take it). --tp N plans "
            "FSDP2 x TP (or HSDP x TP) with the planning functions the DTensor layout runs; TP's own "
            "activation all-reduces depend on the batch and are not counted. Bytes are counted as shardopt.sharding.comm counts them "
            "(all-gather: output, reduce-scatter: input, all-to-all: bytes sent to other ranks); collectives "
            "that DDP, FSDP2 or DeepSpeed issue themselves are listed under their name."
        ),
    )
    p.add_argument("--model", default="llama-8b",
                   help=f"a preset ({presets}); a Hugging Face config.json or its folder (shapes only, no "
                        "weights, via transformers); or module:function returning an nn.Module built on the "
                        "meta device (default: llama-8b)")
    p.add_argument("--world-size", type=_world_sizes, default=None, metavar="W[,W...]",
                   help="data-parallel world sizes, e.g. 8,64,512,4096 (default: 8; for hsdp:RxS, R x S)")
    p.add_argument("--layout", default="zero1",
                   help=f"{LAYOUT_HELP} (default: zero1). hsdp:RxS is R replicas of S FSDP2 shards; one of "
                        "R and S may be * to follow each world size (hsdp:*x8)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="default: adamw. muon splits the model with shardopt.muon_param_groups")
    p.add_argument("--muon-aux", choices=("adamw", "lion"), default="adamw",
                   help="the algorithm of Muon's auxiliary group (embeddings, head, norms, biases)")
    p.add_argument("--param-dtype", choices=DTYPES, default="bf16",
                   help="parameter and gradient dtype (default: bf16, with shardopt's fp32 master copy sharded "
                        "like the state)")
    p.add_argument("--state-dtype", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="optimizer state precision, the optimizers' state_dtype (default: fp32; bf16: 2 bytes per "
                        "state element; int8: 1 byte per element + one fp32 scale per 256 elements for matrices "
                        "of at least 4096 elements whose rows are a multiple of 256, fp32 for the others)")
    p.add_argument("--reduce-gradients", action="store_true",
                   help="zero1: the optimizer reduce-scatters the gradients itself (no DDP)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="fsdp2/hsdp: a tensor-parallel mesh dimension of N ranks (the world size counts it), "
                        "nn.Linear modules cut Megatron-style by name: column-parallel "
                        + "/".join(TP_COLWISE[:5]) + "/..., row-parallel " + "/".join(TP_ROWWISE[:4]) + "/... "
                        "(default: 1)")
    p.add_argument("--comm-dtype", choices=("fp32", "bf16"), default=None,
                   help="fsdp2/hsdp: dtype of Muon's all-to-alls (the optimizer's comm_dtype; default fp32)")
    p.add_argument("--gpu", choices=tuple(GPUS), default="h100",
                   help="hardware profile for the estimated step time: " +
                        "; ".join(f"{k}: {g.name}, {g.hbm_bytes_per_s / 1e12:g} TB/s, "
                                  f"{g.bf16_flops / 1e12:g} bf16 TFLOP/s" for k, g in GPUS.items()))
    p.add_argument("--link-gbps", type=_positive_float, default=DEFAULT_LINK_GBPS,
                   help=f"network bandwidth per rank in Gb/s for the estimate (default: {DEFAULT_LINK_GBPS:g})")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the plan as JSON to PATH (no PATH: print JSON instead of the tables)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="draw per-rank memory and communication against W (log scale) to PNG")
    return p


def run(args) -> int:
    try:
        result = plan(args.model, world_sizes=args.world_size, layout=args.layout, optimizer=args.optimizer,
                      param_dtype=args.param_dtype, muon_aux=args.muon_aux, reduce_gradients=args.reduce_gradients,
                      comm_dtype=args.comm_dtype, gpu=args.gpu, link_gbps=args.link_gbps, tp=args.tp,
                      state_dtype=args.state_dtype)
    except ValueError as e:
        raise CommandError(str(e)) from e
    if args.json == "-":
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.format())
        if args.json:
            Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
            print(f"\nwrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        if args.json != "-":
            print(f"wrote {args.plot}")
    return 0


__all__ = ["plan", "Plan", "WorldPlan", "Collective", "GPUS", "state_element_bytes", "master_element_bytes",
           "check_state_dtype"]
