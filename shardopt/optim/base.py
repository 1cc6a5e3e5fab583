"""``ShardedOptimizer``: the machinery Lion, AdamW and Muon share.

An optimizer is a list of param groups, each naming an *algorithm* (``lion``,
``adamw`` or ``muon``; Muon's auxiliary groups name ``adamw`` or ``lion``). The
base class picks a *layout* from ``shardopt.sharding`` (single device, ZeRO-1
or FSDP2 DTensor shards), creates every state tensor eagerly in that layout,
and runs one step as:

    layout.prepare_grads()               # e.g. reduce-scatter under ZeRO-1
    clip / non-finite check              # one scalar all-reduce
    algorithm.step(...) per group        # kernels on this rank's pieces
    master -> param, layout.finish()     # e.g. the ZeRO-1 all-gather

Algorithms subclass :class:`Algorithm` and override ``step``; the public
optimizers are thin subclasses that set defaults and validate arguments.
"""
from __future__ import annotations

import collections
import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from .. import kernels
from ..sharding import make_layout

LOW_PRECISION = (torch.bfloat16, torch.float16)
NONFINITE_CHOICES = ("skip", "raise", None)
ALGORITHMS: dict[str, "Algorithm"] = {}


def register(cls: type) -> type:
    """Class decorator: make an :class:`Algorithm` available to param groups by its name."""
    ALGORITHMS[cls.name] = cls()
    return cls


class NonFiniteGradientError(FloatingPointError):
    """Raised on every rank together when ``nonfinite='raise'`` sees inf/NaN gradients."""


class Algorithm:
    """One update rule. ``state_keys`` are fp32 tensors shaped like the local piece."""

    name = ""
    matrix = False  # True: needs whole 2-D matrices (Muon)
    state_keys: tuple = ()
    defaults: dict = {}

    def validate(self, group: dict, describe) -> None:
        lr = group.get("lr")
        if not isinstance(lr, (int, float, torch.Tensor)) or lr < 0:
            raise ValueError(f"invalid learning rate {lr!r} for the {self.name} group of {describe(0)}: it must be >= 0")
        wd = group.get("weight_decay", 0.0)
        if wd < 0:
            raise ValueError(f"invalid weight_decay {wd!r} for the {self.name} group of {describe(0)}: it must be >= 0")

    @staticmethod
    def check_betas(group, describe, name="betas"):
        betas = group.get(name)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
            raise ValueError(
                f"invalid {name} {betas!r} for the group of {describe(0)}: both must lie in [0, 1)"
            )

    def step(self, opt: "ShardedOptimizer", group: dict, idx: list[int], params, grads, states, step: int) -> None:
        raise NotImplementedError


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
    ):
        if sharding not in ("auto", "zero1", "fsdp2", "none"):
            raise ValueError(f"unknown sharding {sharding!r}; valid: 'auto', 'zero1', 'fsdp2', 'none'")
        if nonfinite not in NONFINITE_CHOICES:
            raise ValueError(f"unknown nonfinite {nonfinite!r}; valid: 'skip', 'raise', None")
        kernels.validate_backend(backend)
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm!r}")
        if grad_clip_value is not None and not grad_clip_value > 0:
            raise ValueError(f"grad_clip_value must be > 0 or None, got {grad_clip_value!r}")
        defaults = dict(defaults)
        defaults.setdefault("algorithm", self.algorithm)
        self.sharding = sharding
        self.process_group = process_group
        self.reduce_gradients = reduce_gradients
        self.nonfinite = nonfinite
        self.backend = backend
        self.grad_clip_norm = grad_clip_norm
        self.grad_clip_value = grad_clip_value
        self.master_weights = master_weights
        self.comm_dtype = comm_dtype
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        self.ns_shapes: list[tuple] = []  # shapes orthogonalized on this rank in the last step
        self._layout = None
        self._layout_key = None
        super().__init__(params, defaults)
        self._ready = True
        self._ensure_layout()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        algo_name = param_group.get("algorithm", self.defaults.get("algorithm", self.algorithm))
        if algo_name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algo_name!r} in a param group; valid: {', '.join(sorted(ALGORITHMS))}")
        algo = ALGORITHMS[algo_name]
        # algorithm-specific defaults first (e.g. betas for a Muon aux AdamW group)
        for k, v in algo.defaults.items():
            if k not in param_group and (k not in self.defaults or algo_name != self.defaults.get("algorithm")):
                param_group.setdefault(k, v)
        param_group["algorithm"] = algo_name
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        names = group.get("param_names")

        def describe(k):
            p = group["params"][k] if group["params"] else None
            nm = names[k] if names else f"param_groups[{gi}]['params'][{k}]"
            return f"{nm} (shape {tuple(p.shape)})" if p is not None else nm

        algo.validate(group, describe)
        for k, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise ValueError(f"shardopt optimizers need floating-point parameters; {describe(k)} is {p.dtype}")
            if algo.matrix and p.dim() != 2:
                raise ValueError(
                    f"{describe(k)} is {p.dim()}-D but sits in a Muon group, which takes 2-D hidden matrices only; "
                    "put it in an auxiliary group ({'algorithm': 'adamw'} or 'lion'), e.g. with shardopt.muon_param_groups(model)"
                )
        if getattr(self, "_ready", False):
            self._layout = None
            self._ensure_layout()

    # ------------------------------------------------------------------ layout
    def _flat_params(self):
        params, names, gidx = [], [], []
        for gi, g in enumerate(self.param_groups):
            gn = g.get("param_names")
            for k, p in enumerate(g["params"]):
                params.append(p)
                names.append(gn[k] if gn else f"param_groups[{gi}]['params'][{k}]")
                gidx.append(gi)
        return params, names, gidx

    def _ensure_layout(self):
        """(Re)build the layout when the parameter list changed.

        accelerate swaps in the FSDP2 DTensor parameters after the optimizer
        is built; state made for the old parameters is then rebuilt for the new
        ones, which is only safe before the first step.
        """
        params, names, gidx = self._flat_params()
        key = tuple(id(p) for p in params)
        if self._layout is not None and key == self._layout_key:
            return
        whole = [ALGORITHMS[self.param_groups[g]["algorithm"]].matrix for g in gidx]
        layout = make_layout(
            params, names, whole, self.sharding, self.process_group, self.reduce_gradients,
            ns_steps=[self.param_groups[g].get("ns_steps", 5) for g in gidx],
            comm_dtype=self.comm_dtype,
        )
        carried = {}
        trained = any(float(st.get("step", 0)) > 0 for st in self.state.values())
        if self._layout is not None and layout.name == "none" and self._layout.name == "none":
            # A local layout has no cross-parameter structure, so state follows its parameter, as in
            # torch.optim: DeepSpeed ZeRO steps one param group at a time by narrowing param_groups.
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
        self.state = collections.defaultdict(dict)  # as torch.optim keeps it
        self.state.update(carried)
        self._init_state()

    def _init_state(self):
        layout = self._layout
        params, names, gidx = self._flat_params()
        for i, p in enumerate(params):
            if "step" in self.state.get(p, {}):  # carried over by _ensure_layout
                continue
            algo = ALGORITHMS[self.param_groups[gidx[i]]["algorithm"]]
            shape = layout.local_shape(i)
            dev = p.device if not _is_dtensor(p) else p.to_local().device
            st: dict[str, Any] = {"step": torch.tensor(0.0)}
            for k in algo.state_keys:
                st[k] = layout.wrap_state(i, torch.zeros(shape, dtype=torch.float32, device=dev))
            if self.master_weights and p.dtype in LOW_PRECISION:
                st["master_param"] = layout.wrap_state(i, layout.param_view(i).detach().float().clone())
            self.state[p] = st

    @property
    def layout(self):
        self._ensure_layout()
        return self._layout

    # ------------------------------------------------------------------ state_dict
    def state_dict(self):
        self._ensure_layout()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        """torch.optim semantics for a state_dict of this rank's own layout.

        A state_dict from another world size or layout has other local shapes;
        that is refused (use ``shardopt.checkpoint`` to reshard) rather than
        loaded into the wrong elements.
        """
        self._ensure_layout()
        super().load_state_dict(state_dict)
        params = self._flat_params()[0]
        # torch casts floating state to the param dtype (its _cast calls
        # Optimizer._process_value_according_to_param_policy by class name, not the override below),
        # so fp32 state of bf16 params would arrive as bf16: put back the saved dtype.
        saved_ids = [j for g in state_dict["param_groups"] for j in g["params"]]
        for pid, p in zip(saved_ids, params):
            for k, v in state_dict["state"].get(pid, {}).items():
                cur = self.state[p].get(k)
                if (k != "step" and torch.is_tensor(v) and torch.is_tensor(cur) and not _is_dtensor(cur)
                        and cur.dtype != v.dtype):
                    self.state[p][k] = v.detach().to(device=cur.device, copy=True)
        for i, p in enumerate(params):
            want = tuple(self._layout.local_shape(i))
            for k, v in self.state[p].items():
                if k == "step" or not torch.is_tensor(v):
                    continue
                have = tuple((v.to_local() if _is_dtensor(v) else v).shape)
                if have != want:
                    raise ValueError(
                        f"shardopt: state '{k}' of {self._describe(i)} has local shape {have}, but this rank's "
                        f"{self._layout.name} layout (world size {self._layout.world_size}) expects {want}. "
                        "The state_dict was saved with another world size or layout: load it with "
                        "shardopt.checkpoint.load, which reshards"
                    )

    @staticmethod
    def _process_value_according_to_param_policy(param, value, param_id, param_groups, key=None):
        # State stays fp32 whatever the parameter dtype (torch would cast it to bf16).
        if key == "step" or not torch.is_tensor(value):
            return value
        dev = param.to_local().device if _is_dtensor(param) else param.device
        return value.to(device=dev) if not _is_dtensor(value) else value

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
        self._ensure_layout()
        layout = self._layout
        params, names, gidx = self._flat_params()
        for i, p in enumerate(params):
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"shardopt optimizers do not support sparse gradients; {self._describe(i)} has one")
        layout.prepare_grads()
        # this rank's pieces, per group
        per_group: list[list[int]] = [[] for _ in self.param_groups]
        grads: dict[int, torch.Tensor] = {}
        stepped: list[list[int]] = [[] for _ in self.param_groups]
        for i, p in enumerate(params):
            # a parameter without a local gradient has no reduce-scattered one either
            if p.grad is None:
                continue
            stepped[gidx[i]].append(i)
            g = layout.grad_view(i)
            if g is None:
                continue
            grads[i] = g
            per_group[gidx[i]].append(i)
        if not self._clip_and_check(grads):
            return loss
        self.ns_shapes = []
        for gi, group in enumerate(self.param_groups):
            algo = ALGORITHMS[group["algorithm"]]
            idx = per_group[gi]
            if algo.matrix:
                idx = layout.matrix_indices(idx)
            # every rank counts steps for every parameter with a gradient, owned or not,
            # so the state is the same on all ranks
            steps = [self.state[params[i]]["step"] for i in stepped[gi]]
            if not steps:
                continue
            torch._foreach_add_(steps, 1.0)
            step = int(steps[0].item())
            if not idx and not algo.matrix:
                continue
            work = []
            for i in idx:
                st = self.state[params[i]]
                work.append(st["master_param"] if "master_param" in st else layout.param_view(i))
            pv = [layout.local_state(w) for w in work]
            gv = [grads[i] for i in idx]
            sv = {k: [layout.local_state(self.state[params[i]][k]) for i in idx] for k in algo.state_keys}
            algo.step(self, group, idx, pv, gv, sv, step)
            masters = [(layout.param_view(i), layout.local_state(self.state[params[i]]["master_param"]))
                       for i in idx if "master_param" in self.state[params[i]]]
            if masters:
                torch._foreach_copy_([m[0] for m in masters], [m[1] for m in masters])
        layout.finish()
        return loss

    def _clip_and_check(self, grads: dict) -> bool:
        """Value clip, global-norm clip and the non-finite check. False means skip the step."""
        gl = [g for g in grads.values() if g.numel() > 0]
        if self.grad_clip_value is not None and gl:
            torch._foreach_clamp_min_(gl, -self.grad_clip_value)
            torch._foreach_clamp_max_(gl, self.grad_clip_value)
        if self.grad_clip_norm is None and self.nonfinite is None:
            return True
        layout = self._layout
        dev = gl[0].device if gl else _device_of(self._flat_params()[0][0])
        if gl:
            norms = torch._foreach_norm(gl, 2, dtype=torch.float64)
            sq = torch.stack(norms).square().sum().reshape(1)
        else:
            sq = torch.zeros(1, dtype=torch.float64, device=dev)
        sq = layout.all_reduce_sum(sq)
        total_sq = float(sq.item())
        if not math.isfinite(total_sq):
            self.last_grad_norm = float("nan")
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    "shardopt: non-finite gradient (inf or NaN) found on at least one rank; "
                    "the step was not applied and the optimizer state is unchanged. "
                    "Use nonfinite='skip' to skip such steps instead"
                )
            if self.nonfinite == "skip":
                self.skipped_steps += 1
                if self.skipped_steps in (1, 10, 100) or self.skipped_steps % 1000 == 0:
                    warnings.warn(
                        f"shardopt: skipped a step with non-finite gradients ({self.skipped_steps} so far)",
                        RuntimeWarning,
                    )
                return False
        norm = math.sqrt(total_sq)
        self.last_grad_norm = norm
        if self.grad_clip_norm is not None and gl:
            coef = self.grad_clip_norm / (norm + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_(gl, coef)
        return True


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or (hasattr(t, "to_local") and hasattr(t, "placements"))


def _device_of(p):
    return p.to_local().device if _is_dtensor(p) else p.device
