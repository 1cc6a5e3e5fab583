"""``ShardedOptimizer``: the machinery Lion, AdamW and Muon share.

An optimizer is a list of param groups, each naming an *algorithm* (``lion``,
``adamw`` or ``muon``; Muon's auxiliary groups name ``adamw`` or ``lion``). The
base class picks a *layout* from ``shardopt.sharding`` (single device, ZeRO-1
or FSDP2 DTensor shards), creates every state tensor eagerly in that layout,
and runs one step as:

    layout.prepare_grads()                 # e.g. reduce-scatter under ZeRO-1
    kernels.grad_stats(...)                # the fused gradient pass: sum of squares, inf/NaN
    layout.all_reduce_sum([stats, has-a-gradient counts])   # one all-reduce
    gradpass.decide(...)                   # skip flag and clip coefficient, as device tensors
    algorithm.step(...) per group          # kernels on this rank's pieces, per-parameter steps
    master -> param, layout.finish()       # e.g. the ZeRO-1 all-gather

Per-parameter step counts live in :mod:`._steps`, hyperparameter checks in
:mod:`._checks`, ``state_dict``/``load_state_dict`` in :mod:`._state_dict`.
Algorithms subclass :class:`Algorithm` and override ``step``; the public
optimizers are thin subclasses that set defaults.
"""
from __future__ import annotations

import collections
import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from .. import kernels
from ..kernels import gradpass, state_precision
from ..sharding import comm, make_layout
from . import _checks, _state_dict, _steps

LOW_PRECISION = (torch.bfloat16, torch.float16)
NONFINITE_CHOICES = ("skip", "raise", None)
ALGORITHMS: dict[str, "Algorithm"] = {}
# group keys that are bookkeeping, not hyperparameters
GROUP_META = ("params", "param_names", "algorithm")


def register(cls: type) -> type:
    """Class decorator: make an :class:`Algorithm` available to param groups by its name."""
    ALGORITHMS[cls.name] = cls()
    return cls


class NonFiniteGradientError(FloatingPointError):
    """Raised on every rank together when ``nonfinite='raise'`` sees inf/NaN gradients."""


class _Hooks:
    """What :meth:`ShardedOptimizer.attach` returns: ``remove()`` takes the hooks off again."""

    def __init__(self, handles, opt, ids):
        self.handles, self.opt, self.ids = handles, opt, ids

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.opt._hooked_ids -= self.ids
        layout = self.opt._layout
        if layout is not None and layout.name == "zero1":
            layout.hooked = {i for p_id, i in self.opt._index_of.items() if p_id in self.opt._hooked_ids}


@dataclass
class GradTransform:
    """How an update reads its gradients (see :mod:`shardopt.kernels.torch_ops`)."""

    clip_value: float | None = None
    grad_scale: torch.Tensor | None = None  # clip coefficient, fp32 0-d
    found_inf: torch.Tensor | None = None  # a device skip flag (None where the host decided)


@dataclass
class _Plan:
    """What every step walks, kept while the param groups hold the same tensors and the layout is the same.

    Built from ``param_groups`` and the layout only (never from gradients, which may change every step).
    """

    key: tuple  # per group, the ids of its params
    layout: Any
    params: list
    gidx: list[int]
    members: list[list[int]]  # per group, its flat indices
    owned: list[bool]  # layout.owns(i)
    in_norm: list[bool]  # layout.counts_in_norm(i)
    all_owned: bool
    all_in_norm: bool


class Algorithm:
    """One update rule. State tensors are shaped like the local piece of each parameter."""

    name = ""
    matrix = False  # True: needs whole 2-D matrices (Muon)
    defaults: dict = {}

    def state_keys(self, group: dict) -> tuple:
        return ()

    def validate(self, group: dict, where: str) -> None:
        """Check every hyperparameter of ``group`` (``where`` names it in errors)."""
        _checks.lr_and_decay(group, where)
        _checks.state_dtype(group.get("state_dtype", state_precision.DEFAULT), where)

    def validate_param(self, group: dict, p, describe: str) -> None:
        """Check one parameter of ``group`` against the group's hyperparameters (e.g. Muon's ns_split)."""

    def resolved(self, group: dict, hyper: dict) -> dict:
        """``hyper`` (the group's hyperparameters) with defaults that depend on the machine filled in.

        Ranks compare these at construction, so ranks that would resolve a default differently (a
        cluster mixing CPU generations) get a clear error instead of mismatched collectives.
        """
        return hyper

    def ns_cost(self, group: dict, shape) -> float:
        """Newton-Schulz FLOPs of one step on a parameter of ``shape`` (owners are balanced by it)."""
        if not self.matrix or len(shape) != 2:
            return 0.0
        from ..functional import ns_flops

        return float(ns_flops(tuple(shape), group.get("ns_steps", 5)))

    def step(self, opt: "ShardedOptimizer", group: dict, idx: list[int], params, grads, states,
             steps: list[int], gt: GradTransform) -> None:
        raise NotImplementedError


def state_dtype(p: torch.Tensor, group: dict | None = None) -> torch.dtype:
    """The dtype of ``p``'s state tensors in ``group``: its ``state_dtype`` (fp32 by default, or bf16) for
    fp32/bf16/fp16 parameters; fp64 for fp64 and the parameter's own dtype for complex ones, whatever the
    group asks (see :mod:`shardopt.kernels.state_precision`)."""
    fmt = (group or {}).get("state_dtype", state_precision.DEFAULT)
    return state_precision.storage_dtype(fmt, p.dtype)


class ShardedOptimizer(Optimizer):
    """Base of shardopt's optimizers (see module docstring)."""

    algorithm = ""

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        sharding: str = "auto",
        process_group=None,
        reduce_gradients: bool = False,
        nonfinite: str | None = "skip",
        backend: str = "auto",
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        master_weights: bool = True,
        comm_dtype: torch.dtype | None = None,
        overlap_comm: bool = True,
        overlap_param_gather: bool = False,
        state_dtype: str = state_precision.DEFAULT,
    ):
        _checks.state_dtype(state_dtype, "the optimizer")
        _checks.optimizer_options(
            sharding=sharding, nonfinite=nonfinite, grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value,
            master_weights=master_weights, reduce_gradients=reduce_gradients, comm_dtype=comm_dtype,
            nonfinite_choices=NONFINITE_CHOICES, overlap_comm=overlap_comm, overlap_param_gather=overlap_param_gather,
        )
        kernels.validate_backend(backend)
        defaults = dict(defaults)
        defaults.setdefault("algorithm", self.algorithm)
        # a per-group setting like lr, but one default for every group, auxiliary ones included
        defaults["state_dtype"] = state_dtype
        self.sharding = sharding
        self.process_group = process_group
        self.reduce_gradients = reduce_gradients
        self.nonfinite = nonfinite
        self.backend = backend
        self.grad_clip_norm = grad_clip_norm
        self.grad_clip_value = grad_clip_value
        self.master_weights = master_weights
        self.comm_dtype = comm_dtype
        self.overlap_comm = overlap_comm
        self.overlap_param_gather = overlap_param_gather
        self._hooked_ids: set = set()  # parameters whose modules wait for their all-gather (attach)
        self._warned_unattached = False
        self._counter = _steps.StepCounter()
        self._host_skipped = 0
        self._last_norm: torch.Tensor | None = None
        self.ns_shapes: list[tuple] = []  # shapes orthogonalized on this rank in the last step
        self._layout = None
        self._layout_key = None
        self._plan: _Plan | None = None  # see _step_plan
        self._keep_state = False
        # set by an integration whose framework owns the partitioning (DeepSpeed): builds the layout instead
        # of make_layout, with the same arguments
        self._layout_factory = None
        super().__init__(params, defaults)
        self._ready = True
        self._ensure_layout()

    # ------------------------------------------------------------------ reporting
    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (on a device, reading this waits for the last flag)."""
        self._counter.resolve(wait=True)
        return self._host_skipped + self._counter.skipped

    @property
    def last_grad_norm(self) -> float | None:
        """The global gradient norm of the last step (NaN if non-finite); read lazily from the device."""
        if self._last_norm is None:
            return None
        return float(self._last_norm)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        algo_name = param_group.get("algorithm", self.defaults.get("algorithm", self.algorithm))
        if algo_name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algo_name!r} in a param group; valid: {', '.join(sorted(ALGORITHMS))}")
        algo = ALGORITHMS[algo_name]
        gi = len(self.param_groups)
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, (list, tuple)):
            params = list(params)
        param_group["params"] = params if params is not None else []
        # defaults: the optimizer's for its own algorithm, the algorithm's for an auxiliary group
        own = algo_name == self.defaults.get("algorithm")
        param_group.setdefault("state_dtype", self.defaults.get("state_dtype", state_precision.DEFAULT))
        for k, v in (self.defaults if own else algo.defaults).items():
            if k not in GROUP_META:
                param_group.setdefault(k, v)
        if not own:
            for k, v in algo.defaults.items():
                param_group.setdefault(k, v)
        param_group["algorithm"] = algo_name
        # hyperparameters first, before anything looks at the parameters
        algo.validate(param_group, self._where(gi, param_group))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for k, p in enumerate(group["params"]):
            d = self._describe_in(group, gi, k)
            if not (p.is_floating_point() or p.is_complex()):
                raise ValueError(f"shardopt optimizers need floating-point parameters; {d} is {p.dtype}")
            if algo.matrix and p.dim() != 2:
                raise ValueError(
                    f"{d} is {p.dim()}-D but sits in a Muon group, which takes 2-D hidden matrices only; "
                    "put it in an auxiliary group ({'algorithm': 'adamw'} or 'lion'), e.g. with shardopt.muon_param_groups(model)"
                )
            if algo.matrix and p.is_complex():
                raise ValueError(f"{d} is complex; Muon takes real matrices only (as torch.optim.Muon does)")
            algo.validate_param(group, p, f"{d} in {self._where(gi, group)}")
        if getattr(self, "_ready", False):
            old = self._layout
            trained = any(_steps.get(st) > 0 for st in self.state.values() if "step" in st)
            if old is not None and trained and not old.state_per_param:
                self.param_groups.pop()
                raise ValueError(
                    f"add_param_group after training steps is not supported by the {old.name!r} layout (its state "
                    "is cut across ranks for the parameters it had); add every group before the first step")
            self._ensure_layout()  # a local layout carries the other parameters' state over, as torch.optim does

    @staticmethod
    def _describe_in(group, gi, k):
        names = group.get("param_names")
        p = group["params"][k]
        nm = names[k] if names and k < len(names) else f"param_groups[{gi}]['params'][{k}]"
        return f"{nm} (shape {tuple(p.shape)})"

    def _where(self, gi: int, group: dict) -> str:
        """How an error names a param group: its index, algorithm and first parameter."""
        ps = group.get("params") or []
        first = ""
        if ps:
            names = group.get("param_names")
            first = f", first parameter {names[0] if names else 'params[0]'} of shape {tuple(ps[0].shape)}"
        return f"param group {gi} ({group.get('algorithm')}{first})"

    # ------------------------------------------------------------------ layout
    def _groups_key(self) -> tuple:
        return tuple(tuple(map(id, g["params"])) for g in self.param_groups)

    def _step_plan(self, key: tuple | None = None) -> _Plan:
        """The cached :class:`_Plan`; rebuilt when a group's parameters or the layout changed.
        ``key``: :meth:`_groups_key`, when the caller has it already."""
        plan, layout = self._plan, self._layout
        key = self._groups_key() if key is None else key
        if plan is not None and plan.layout is layout and plan.key == key:
            return plan
        params, gidx, members = [], [], []
        for gi, g in enumerate(self.param_groups):
            members.append(list(range(len(params), len(params) + len(g["params"]))))
            params.extend(g["params"])
            gidx.extend([gi] * len(g["params"]))
        owned = [layout.owns(i) for i in range(len(params))]
        in_norm = [layout.counts_in_norm(i) for i in range(len(params))]
        self._plan = _Plan(key, layout, params, gidx, members, owned, in_norm, all(owned), all(in_norm))
        return self._plan

    def _flat_params(self):
        params, names, gidx = [], [], []
        for gi, g in enumerate(self.param_groups):
            gn = g.get("param_names")
            for k, p in enumerate(g["params"]):
                params.append(p)
                names.append(gn[k] if gn else f"param_groups[{gi}]['params'][{k}]")
                gidx.append(gi)
        return params, names, gidx

    def _group_signature(self, gi: int) -> str:
        g = self.param_groups[gi]
        hyper = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k not in GROUP_META}
        hyper = ALGORITHMS[g["algorithm"]].resolved(g, hyper)
        return f"{g['algorithm']}:{sorted(hyper.items(), key=lambda kv: kv[0])!r}"

    def _ensure_layout(self, key: tuple | None = None):
        """(Re)build the layout when the parameter list changed.

        accelerate swaps in the FSDP2 DTensor parameters after the optimizer
        is built; state made for the old parameters is then rebuilt for the new
        ones, which is only safe before the first step.
        """
        plan = self._plan
        if self._layout is not None and plan is not None and plan.layout is self._layout and \
                plan.key == (self._groups_key() if key is None else key):
            return  # the groups hold the tensors the layout was built for (the common case: every step)
        params, names, gidx = self._flat_params()
        key = tuple(id(p) for p in params)
        if self._layout is not None and key == self._layout_key:
            return
        algos = [ALGORITHMS[self.param_groups[g]["algorithm"]] for g in gidx]
        whole = [a.matrix for a in algos]
        layout = (self._layout_factory or make_layout)(
            params, names, whole, self.sharding, self.process_group, self.reduce_gradients,
            ns_costs=[a.ns_cost(self.param_groups[g], p.shape) for a, g, p in zip(algos, gidx, params)],
            comm_dtype=self.comm_dtype,
            group_signatures=[self._group_signature(g) for g in range(len(self.param_groups))],
            group_of=gidx,
            copies_now=[self.master_weights and p.dtype in LOW_PRECISION for p in params],
            overlap=self.overlap_comm,
            # int8 state: ZeRO-1 cuts such parameters on its quantization blocks
            blocks=[max(1, state_precision.int8_block(p.shape)) if self._int8_group(self.param_groups[g]) else 1
                    for g, p in zip(gidx, params)],
        )
        if self.overlap_param_gather and layout.name not in ("zero1", "none"):
            raise ValueError(
                f"overlap_param_gather=True applies to the ZeRO-1 layout (plain parameters under torch.distributed), "
                f"not to layout {layout.name!r}: FSDP2 gathers the parameters itself (and prefetches them)"
            )
        if self.overlap_param_gather and layout.name == "zero1":
            layout.overlap_param_gather = True
            layout.hooked = {i for i, p in enumerate(params) if id(p) in self._hooked_ids}
        carried = {}
        trained = any(_steps.get(st) > 0 for st in self.state.values() if "step" in st)
        if self._keep_state:
            # restored by deepcopy/unpickling: the state already belongs to these parameters
            carried = {p: st for p, st in self.state.items() if "step" in st}
            self._keep_state = False
        elif self._layout is not None and layout.state_per_param and self._layout.state_per_param:
            # A local layout (or one over DeepSpeed's flat partitions) keeps each parameter's state with
            # it, as torch.optim does: DeepSpeed ZeRO steps one param group at a time by narrowing
            # param_groups.
            # Only parameters replaced wholesale before any step (DeepSpeed's flat partitions) leave
            # their state behind.
            if trained or set(key) & set(self._layout_key):
                carried = {p: st for p, st in self.state.items() if "step" in st}
        elif self._layout is not None and trained:
            raise RuntimeError(
                "shardopt: the optimizer's parameters were replaced after training steps were taken; "
                "build the optimizer after wrapping the model (or swap parameters before the first step)"
            )
        self._layout = layout
        self._layout_key = key
        self._names, self._gidx = names, gidx
        self._index_of = {id(p): i for i, p in enumerate(params)}
        self.state = collections.defaultdict(dict)  # as torch.optim keeps it
        self.state.update(carried)
        self._init_state()

    def _init_state(self):
        layout = self._layout
        params, names, gidx = self._flat_params()
        for i, p in enumerate(params):
            group = self.param_groups[gidx[i]]
            algo = ALGORITHMS[group["algorithm"]]
            have = self.state.get(p, {})
            if "step" in have and all(k in have for k in algo.state_keys(group)):
                continue  # carried over by _ensure_layout
            shape = layout.local_shape(i)
            dev = _device_of(p)
            st: dict[str, Any] = {"step": 0}
            q8 = self._int8_param(i, p, group)
            for k in algo.state_keys(group):
                if q8:
                    self._put_int8(st, i, k, device=dev)
                    continue
                st[k] = layout.wrap_state(i, torch.zeros(shape, dtype=state_dtype(p, group), device=dev))
            if self.master_weights and p.dtype in LOW_PRECISION:
                st["master_param"] = layout.wrap_state(i, layout.param_view(i).detach().float().clone())
            self.state[p] = st

    def _put_int8(self, st, i, key, *, values=None, step=0, codes=None, scale=None, device=None):
        """Sets ``st[key]`` and ``st[key + "_scale"]``, parameter ``i``'s int8 state in this layout: the given
        ``codes`` and ``scale`` as they are, else ``values`` (float, this rank's piece) quantized with the
        layout's block and the rounding of ``step``, else zeros (a fresh state) on ``device``."""
        layout = self._layout
        kind = state_precision.int8_kind(key)
        if codes is None and values is not None:
            codes, scale = state_precision.quantize(values.detach().float().contiguous(), step, kind,
                                                    layout.int8_block(i) or state_precision.BLOCK)
        elif codes is None:
            codes = torch.zeros(layout.local_shape(i), dtype=state_precision.code_dtype(kind), device=device)
            scale = torch.zeros(layout.local_scale_shape(i), dtype=torch.float32, device=device)
        st[key] = layout.wrap_state(i, codes.view(tuple(layout.local_shape(i))))
        st[key + state_precision.SCALE_SUFFIX] = layout.wrap_scale(i, scale.reshape(layout.local_scale_shape(i)))

    @staticmethod
    def _int8_group(group) -> bool:
        return group.get("state_dtype", state_precision.DEFAULT) == "int8"

    def _int8_param(self, i, p, group) -> bool:
        """Whether parameter ``i`` keeps int8 state: its group asks, its dtype is a float one, and the layout
        can hold whole blocks of it (else its state is fp32)."""
        return (self._int8_group(group) and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and self._layout.int8_ok(i))

    def _state_views(self, group, keys, idx, sts):
        """This rank's state tensors of ``sts`` (parameters ``idx``) per key, as the kernels take them: a
        quantized one as a :class:`~shardopt.kernels.state_precision.Q8` of its codes and scales."""
        layout = self._layout
        sv = {k: layout.local_states([st[k] for st in sts]) for k in keys}
        if self._int8_group(group):
            blocks = [layout.int8_block(i) for i in idx]
            for k in keys:
                sk, kind, lst = k + state_precision.SCALE_SUFFIX, state_precision.int8_kind(k), sv[k]
                for j, st in enumerate(sts):
                    if sk in st:
                        lst[j] = state_precision.Q8(lst[j], layout.local_state(st[sk]), kind, blocks[j])
        return sv

    @property
    def layout(self):
        self._ensure_layout()
        return self._layout

    # ------------------------------------------------------------------ overlapped parameter all-gathers
    def attach(self, model: torch.nn.Module):
        """With ``overlap_param_gather=True``: wait for each parameter's all-gather in a forward
        pre-hook of the module that holds it, instead of at the end of ``step()``.

        Registers one hook on every module of ``model`` that directly holds parameters of this
        optimizer (DDP and other wrappers are walked through). Parameters not in ``model`` are
        still waited for in ``step()``. Returns a handle; ``handle.remove()`` undoes it. Without
        ``overlap_param_gather`` (or on a layout without all-gathers) the hooks do nothing."""
        handles = []
        covered: set = set()
        for m in model.modules():
            ids = frozenset(id(p) for p in m.parameters(recurse=False) if id(p) in self._index_of)
            if not ids:
                continue
            handles.append(m.register_forward_pre_hook(self._gather_hook(ids)))
            covered |= ids
        self._hooked_ids |= covered
        layout = self._layout
        if layout is not None and layout.name == "zero1":
            layout.hooked = {i for p_id, i in self._index_of.items() if p_id in self._hooked_ids}
        return _Hooks(handles, self, covered)

    def _gather_hook(self, ids):
        def hook(module, args):
            layout = self._layout
            if layout is not None and layout.in_flight:
                layout.wait_params([self._index_of[k] for k in ids if k in self._index_of])
        return hook

    def wait_param_gather(self) -> None:
        """Land every all-gather that ``overlap_param_gather`` left in flight (a no-op otherwise)."""
        if self._layout is not None:
            self._layout.wait_params()

    # ------------------------------------------------------------------ state_dict
    def state_dict(self):
        """torch.optim's state_dict (``step`` as a float tensor), plus where it came from under
        ``"shardopt"``: format version, layout, world size and rank."""
        self._ensure_layout()
        self.wait_param_gather()
        self._counter.resolve(wait=True)
        return _state_dict.pack(self)

    def load_state_dict(self, state_dict):
        """Load a state_dict of this optimizer, of ``torch.optim.AdamW`` / ``Muon``, or of an older shardopt.

        All or nothing: everything is checked before anything changes. A
        sharded state_dict loads only on the rank, world size and layout that
        wrote it; use ``shardopt.checkpoint`` to reshard.
        """
        self._ensure_layout()
        self.wait_param_gather()
        self._counter.resolve(wait=True)
        _state_dict.load(self, state_dict)

    def __getstate__(self):
        d = super().__getstate__()
        self.wait_param_gather()
        d.pop("_layout_factory", None)  # holds a process group; an integration installs it again
        d.pop("_plan", None)  # rebuilt at the next step
        for k in ("sharding", "process_group", "reduce_gradients", "nonfinite", "backend", "grad_clip_norm",
                  "grad_clip_value", "master_weights", "comm_dtype", "overlap_comm", "overlap_param_gather",
                  "_host_skipped", "ns_shapes"):
            d[k] = getattr(self, k)
        self._counter.resolve(wait=True)
        d["_skipped_on_device"] = self._counter.skipped
        return d

    def __setstate__(self, state):
        state = dict(state)
        skipped = state.pop("_skipped_on_device", 0)
        state.setdefault("overlap_comm", True)
        state.setdefault("overlap_param_gather", False)
        super().__setstate__(state)
        self._hooked_ids = set()  # hooks belong to the original's modules
        self._warned_unattached = False
        self._counter = _steps.StepCounter()
        self._counter.skipped = skipped
        self._last_norm = None
        self._layout = None
        self._layout_key = None
        self._plan = None
        self._layout_factory = None
        self._keep_state = True
        self._ready = True

    def __deepcopy__(self, memo):
        # a process group is shared, never copied
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    @staticmethod
    def _process_value_according_to_param_policy(param, value, param_id, param_groups, key=None):
        # State stays fp32 whatever the parameter dtype (torch would cast it to bf16).
        if key == "step" or not torch.is_tensor(value):
            return value
        return value.to(device=_device_of(param)) if not _is_dtensor(value) else value

    # ------------------------------------------------------------------ reporting
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (local shards only)."""
        total = 0
        for st in self.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    loc = v.to_local() if _is_dtensor(v) else v
                    total += loc.numel() * loc.element_size()
        return total

    def state_numel(self) -> int:
        total = 0
        for st in self.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    total += (v.to_local() if _is_dtensor(v) else v).numel()
        return total

    def summary(self, print_fn=print) -> list[dict]:
        """Gather and print a per-rank table: owned elements, state bytes, NS FLOPs (see ``optim/_report.py``).

        Collective: every rank calls it; rank 0 prints with ``print_fn`` (None: nothing). Returns one dict per
        rank with the raw numbers.
        """
        from ._report import summary

        self.wait_param_gather()
        return summary(self, print_fn)

    # ------------------------------------------------------------------ step
    def _describe(self, i):
        p = self._flat_params()[0][i]
        return f"{self._names[i]} (shape {tuple(p.shape)})"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        key = self._groups_key()  # once per step: the layout check and the step plan both compare it
        self._ensure_layout(key)
        layout = self._layout
        layout.wait_params()  # gathers overlap_param_gather left in flight, before anything reads parameters
        plan = self._step_plan(key)
        params = plan.params
        self._counter.resolve()
        for i, p in enumerate(params):
            g = p.grad
            if g is not None and g.is_sparse:
                raise ValueError(f"shardopt optimizers do not support sparse gradients; {self._describe(i)} has one")
        layout.prepare_grads()
        grads = layout.grad_views()
        present = self._agree_on_gradients(plan, grads)
        if present is None:
            return loss  # skipped for non-finite gradients, on every rank
        decision, present = present
        gt = GradTransform(self.grad_clip_value, decision.grad_scale if decision else None,
                           decision.found_inf if decision is not None and decision.host_skip() is None else None)
        self.ns_shapes = []
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, plan, grads, present, gt)
            layout.group_done(gi)
        if self.overlap_param_gather and layout.name == "zero1" and not layout.hooked and not self._warned_unattached:
            self._warned_unattached = True
            warnings.warn("shardopt: overlap_param_gather=True but no model is attached (opt.attach(model)); the "
                          "all-gathers are waited for at the end of step() instead", RuntimeWarning)
        layout.finish()
        return loss

    def _step_group(self, gi, group, plan, grads, present, gt):
        layout = self._layout
        params = plan.params
        algo = ALGORITHMS[group["algorithm"]]
        stepped = [i for i in plan.members[gi] if present[i]]
        if not stepped:
            return
        # every rank counts steps for every parameter with a gradient anywhere, owned or not,
        # so the state is the same on all ranks
        state = self.state
        sts = [state[params[i]] for i in stepped]
        if gt.found_inf is not None:
            self._counter.count_unless(sts, gt.found_inf)
        else:
            self._counter.count(sts)
        if algo.matrix:
            idx = layout.matrix_indices(stepped)
        else:
            idx = stepped if plan.all_owned else [i for i in stepped if plan.owned[i]]
            if not idx:
                return
        if idx is not stepped:
            sts = [state[params[i]] for i in idx]
        views = layout.param_views(idx)
        masters = [k for k, st in enumerate(sts) if "master_param" in st]
        work = list(views)
        for k in masters:
            work[k] = sts[k]["master_param"]
        pv = layout.local_states(work)
        gv = [grads[i] if grads[i] is not None else torch.zeros_like(pv[k]) for k, i in enumerate(idx)]
        sv = self._state_views(group, algo.state_keys(group), idx, sts)
        algo.step(self, group, idx, pv, gv, sv, [st["step"] for st in sts], gt)
        if masters:
            torch._foreach_copy_([views[k] for k in masters],
                                 layout.local_states([sts[k]["master_param"] for k in masters]))

    def _agree_on_gradients(self, plan, grads):
        """The fused gradient pass and the one all-reduce of a step.

        Returns None when the step is skipped (every rank decides the same), else
        ``(decision or None, present)``: ``present[i]`` says whether parameter
        ``i`` has a gradient on some rank of the group (a rank without one then
        steps it with zeros, as DDP with ``find_unused_parameters=True`` sums them).
        """
        layout = self._layout
        params = plan.params
        local = [p.grad is not None for p in params]
        need_stats = self.nonfinite is not None or self.grad_clip_norm is not None
        if not need_stats and not layout.distributed:
            self._last_norm = None
            return None, local
        if plan.all_in_norm:
            pieces, replicas = [g for g in grads if g is not None], []
        else:
            pieces = [g for i, g in enumerate(grads) if g is not None and plan.in_norm[i]]
            replicas = [g for i, g in enumerate(grads) if g is not None and not plan.in_norm[i]]
        present_any = pieces or replicas
        dev = present_any[0].device if present_any else (_device_of(params[0]) if params else torch.device("cpu"))
        if need_stats:
            # the norm counts each distinct piece once (its canonical copy); non-finite values count anywhere
            stats = kernels.grad_stats(pieces, clip_value=self.grad_clip_value, backend=self.backend)
            if replicas:
                extra = kernels.grad_stats(replicas, clip_value=self.grad_clip_value, backend=self.backend)
                stats = stats.to(dev) + torch.stack([torch.zeros_like(extra[1]), extra[1]]).to(dev)
        else:
            stats = torch.zeros(2, dtype=comm.STATS_DTYPE, device=dev)
        if layout.distributed:
            buf = torch.cat([stats.to(dev), torch.tensor(local, dtype=comm.STATS_DTYPE, device=dev)])
            buf = layout.all_reduce_sum(buf)
            stats, present = buf[:2], buf[2:].cpu().gt(0).tolist()
        else:
            stats = layout.all_reduce_sum(stats)
            present = local
        if not need_stats:
            self._last_norm = None
            return None, present
        decision = gradpass.decide(stats, clip_norm=self.grad_clip_norm)
        self._last_norm = decision.norm
        skip = decision.host_skip()
        if skip is None and self.nonfinite == "raise":
            skip = bool(decision.found_inf.item())  # raising needs the host to know
        if skip:
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    "shardopt: non-finite gradient (inf or NaN) found on at least one rank; "
                    "the step was not applied and the optimizer state is unchanged. "
                    "Use nonfinite='skip' to skip such steps instead"
                )
            self._host_skipped += 1
            n = self._host_skipped + self._counter.skipped
            if n in (1, 10, 100) or n % 1000 == 0:
                warnings.warn(f"shardopt: skipped a step with non-finite gradients ({n} so far)", RuntimeWarning)
            return None
        return decision, present


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or (hasattr(t, "to_local") and hasattr(t, "placements"))


def _device_of(p):
    return p.to_local().device if _is_dtensor(p) else p.device
