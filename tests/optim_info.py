"""The conformance table, in the shape of torch's ``OptimizerInfo``.

Each row is one optimizer: its kwargs variants, the bad inputs it must refuse,
and an independent reference (``torch.optim.AdamW`` / ``torch.optim.Muon``, or
the DESIGN.md math in ``shardopt.functional`` for Lion). The generic checks in
``test_conformance.py`` run over every (row, variant); a new optimizer or option
is one more row or variant here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import shardopt
from shardopt import functional as F

# options that exist in shardopt only: the reference applies them by hand (clipping before the step)
SHARDOPT_ONLY = ("grad_clip_norm", "grad_clip_value", "backend", "nonfinite", "ns_dtype", "ns_backend")


class LionReference:
    """Lion exactly as DESIGN.md writes it (shardopt.functional.lion), as a tiny optimizer."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        self.params, self.lr, self.betas, self.wd, self.maximize = list(params), lr, betas, weight_decay, maximize
        self.m = [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
                  for p in self.params]

    @torch.no_grad()
    def step(self):
        have = [k for k, p in enumerate(self.params) if p.grad is not None]
        F.lion([self.params[k] for k in have], [self.params[k].grad for k in have], [self.m[k] for k in have],
               lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.wd, maximize=self.maximize)


@dataclass
class OptimInfo:
    name: str
    cls: type
    variants: list  # kwargs for the shardopt constructor
    reference: type  # same math, no sharding; takes the torch-compatible kwargs
    tol: float  # relative tolerance against the reference after a few steps
    torch_format: bool  # the reference is a torch.optim class whose state_dict moves both ways
    matrix_only: bool = False  # Muon: 2-D parameters only
    supports_complex: bool = True
    bad_inputs: list = field(default_factory=list)  # (kwargs, regex)
    shapes: tuple = ((5, 7), (12,), (3, 4, 2), (1,))
    # compare the displacement p - p0 (Muon moves parameters by little, so their relative error hides bugs)
    displacement: bool = False


_COMMON_BAD = [
    (dict(lr=float("nan")), "learning rate"), (dict(lr=float("inf")), "learning rate"), (dict(lr=-1.0), ">= 0"),
    (dict(lr="0.1"), "must be a number"), (dict(lr=None), "must be a number"), (dict(lr=True), "must be a number"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "exactly 1 element"), (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(grad_clip_norm=0.0), "grad_clip_norm"),
    (dict(grad_clip_value=float("nan")), "grad_clip_value"), (dict(nonfinite="ignore"), "nonfinite"),
    (dict(backend="fast"), "unknown backend"), (dict(sharding="zero3"), "sharding"),
    (dict(master_weights="yes"), "master_weights"),
    (dict(overlap_comm=1), "overlap_comm"), (dict(overlap_param_gather="on"), "overlap_param_gather"),
]

INFOS = [
    OptimInfo(
        "Lion", shardopt.Lion,
        [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.95), maximize=True),
         dict(lr=1e-2, grad_clip_norm=0.5), dict(lr=1e-2, grad_clip_value=0.05), dict(lr=1e-2, backend="torch"),
         dict(lr=1e-2, nonfinite=None)],
        LionReference, tol=0.0, torch_format=False,
        bad_inputs=_COMMON_BAD + [(dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(float("nan"), 0.9)), "betas"),
                                  (dict(betas=0.9), "pair"), (dict(maximize=1), "maximize")],
    ),
    OptimInfo(
        "AdamW", shardopt.AdamW,
        [dict(), dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, amsgrad=True), dict(lr=1e-2, maximize=True),
         dict(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.0), dict(lr=1e-2, backend="torch"),
         dict(lr=1e-2, grad_clip_norm=0.5), dict(lr=1e-2, grad_clip_value=0.05)],
        torch.optim.AdamW, tol=1e-6, torch_format=True,
        bad_inputs=_COMMON_BAD + [(dict(eps=0.0), "eps"), (dict(eps=float("nan")), "eps"),
                                  (dict(betas=(0.9, -0.1)), "betas"), (dict(amsgrad="no"), "amsgrad"),
                                  (dict(capturable=True), "capturable"), (dict(fused=True, backend="torch"), "fused")],
    ),
    OptimInfo(
        "Muon", shardopt.Muon,
        [dict(lr=2e-2), dict(lr=2e-2, nesterov=False, weight_decay=0.0), dict(lr=2e-2, adjust_lr_fn="match_rms_adamw"),
         dict(lr=2e-2, grad_clip_norm=0.5), dict(lr=2e-2, ns_dtype=torch.float32)],
        torch.optim.Muon, tol=3e-2, torch_format=True, matrix_only=True, supports_complex=False,
        bad_inputs=_COMMON_BAD + [(dict(eps=0.0), "eps"), (dict(momentum=float("nan")), "momentum"),
                                  (dict(momentum=1.0), "momentum"), (dict(ns_steps=True), "ns_steps"),
                                  (dict(ns_steps=0), "ns_steps"), (dict(nesterov="yes"), "nesterov"),
                                  (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
                                  (dict(ns_dtype="bf16"), "ns_dtype"), (dict(adjust_lr_fn="x"), "adjust_lr_fn")],
        shapes=((5, 7), (12, 4), (8, 8)), displacement=True,
    ),
]

CASES = [(info, k) for info in INFOS for k in range(len(info.variants))]
CASE_IDS = [f"{info.name}-{k}" for info, k in CASES]


def params_for(info: OptimInfo, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in info.shapes]


def grads_for(info: OptimInfo, step: int, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for s in info.shapes:
        t = torch.randn(s, generator=g) * scale
        t[torch.rand(s, generator=g) < 0.05] = 0.0
        out.append(t.to(dtype))
    return out


def torch_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in SHARDOPT_ONLY}


def reference_step(info: OptimInfo, ref, params, kwargs):
    """Clip as shardopt's options ask (value clip, then the global norm as clip_grad_norm_), then step."""
    if kwargs.get("grad_clip_value") is not None:
        torch.nn.utils.clip_grad_value_(params, kwargs["grad_clip_value"])
    if kwargs.get("grad_clip_norm") is not None:
        torch.nn.utils.clip_grad_norm_(params, kwargs["grad_clip_norm"])
    ref.step()


def max_rel(a_list, b_list) -> float:
    err = 0.0
    for a, b in zip(a_list, b_list):
        a, b = a.detach().double(), b.detach().double()
        err = max(err, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return err


def finite(x) -> bool:
    return math.isfinite(float(x))
