"""Muon: momentum, then Newton-Schulz orthogonalization of each full 2-D matrix.

Hidden 2-D matrices go in Muon groups; embeddings, the output head, norms and
biases go in auxiliary groups (``{"algorithm": "adamw"}`` or ``"lion"``), which
:func:`muon_param_groups` builds from a model.
"""
from __future__ import annotations

import functools

import torch

from ..functional import adjust_lr, muon_momentum, newton_schulz, newton_schulz_split
from ..functional.muon import DEFAULT_NS_COEFFICIENTS, NS_COEFFICIENT_NAMES, ns_flops_split
from ..kernels import state_precision
from ..kernels.torch_ops import _gated, effective_grads
from . import _checks
from .base import Algorithm, ShardedOptimizer, register
from .lion import _tuple

NS_BACKENDS = ("torch", "triton", "auto")
# Newton-Schulz precision when a group leaves ns_dtype at None: bf16, as torch.optim.Muon, except on
# a CPU without a native bf16 matmul (see default_ns_dtype)
DEFAULT_NS_DTYPE = torch.bfloat16


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_matmul() -> bool:
    """Whether this CPU runs bf16 matmuls through oneDNN (AVX512-BF16/AMX, or AVX-512 emulation).

    Without it (e.g. an AVX2-only CPU) torch falls back to a scalar bf16 GEMM: 5 Newton-Schulz
    steps on a 1024x256 matrix then take ~50x as long as in fp32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_ns_dtype(device) -> torch.dtype:
    """The Newton-Schulz dtype a group with ``ns_dtype=None`` uses on ``device``.

    bf16 (as torch.optim.Muon) on accelerators and on CPUs with a bf16 matmul; fp32 on other CPUs,
    where it is both far faster and at least as orthogonal (bench prints both).
    """
    if torch.device(device).type == "cpu" and not _cpu_has_bf16_matmul():
        return torch.float32
    return DEFAULT_NS_DTYPE


def _ns_function(backend: str, batch: torch.Tensor):
    """The Newton-Schulz implementation for ``backend`` ("auto": Triton on CUDA when it imports)."""
    if backend == "torch":
        return newton_schulz
    from ..kernels import triton_ns

    if backend == "triton" or (batch.is_cuda and triton_ns.available()):
        return triton_ns.newton_schulz
    return newton_schulz


@register
class MuonAlgorithm(Algorithm):
    name = "muon"
    matrix = True
    defaults = {
        "lr": 1e-3, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True,
        "ns_coefficients": DEFAULT_NS_COEFFICIENTS, "eps": 1e-7, "ns_steps": 5, "adjust_lr_fn": None,
        "ns_dtype": None, "ns_backend": "torch", "ns_split": None, "ns_split_dim": 0,
    }

    def state_keys(self, group):
        return ("momentum_buffer",)

    def validate(self, group, where):
        super().validate(group, where)
        _checks.in_range(group.get("momentum"), "momentum", where, lo=0.0, hi=1.0, hi_open=True)
        _checks.flag(group.get("nesterov"), "nesterov", where)
        _checks.in_range(group.get("eps"), "eps", where, lo=0.0, lo_open=True,
                         hint="Newton-Schulz divides by norm + eps, and a zero gradient would give NaN")
        _checks.integer(group.get("ns_steps"), "ns_steps", where, lo=1, hi=99)
        coeffs = group.get("ns_coefficients")
        if isinstance(coeffs, str):
            if coeffs not in NS_COEFFICIENT_NAMES:
                raise ValueError(f"unknown ns_coefficients {coeffs!r} for {where}; valid: three numbers (a, b, c) "
                                 f"or {', '.join(map(repr, NS_COEFFICIENT_NAMES))}")
        else:
            if not (isinstance(coeffs, (tuple, list)) and len(coeffs) == 3):
                raise ValueError(f"invalid ns_coefficients {coeffs!r} for {where}: it must be three numbers "
                                 "(a, b, c) or 'polar_express'")
            for k, c in enumerate(coeffs):
                _checks.scalar(c, f"ns_coefficients[{k}]", where)
        split = group.get("ns_split")
        if split is not None:
            ok = isinstance(split, int) and not isinstance(split, bool) and split >= 1
            ok = ok or (isinstance(split, (tuple, list)) and len(split) > 0 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in split))
            if not ok:
                raise ValueError(f"invalid ns_split {split!r} for {where}: use None, a number of equal blocks "
                                 "(e.g. 3 for a fused QKV, or the number of heads) or a tuple of block sizes")
        if group.get("ns_split_dim", 0) not in (0, 1) or isinstance(group.get("ns_split_dim", 0), bool):
            raise ValueError(f"invalid ns_split_dim {group.get('ns_split_dim')!r} for {where}: use 0 (row blocks) "
                             "or 1 (column blocks)")
        _checks.choice(group.get("adjust_lr_fn"), "adjust_lr_fn", where, (None, "original", "match_rms_adamw"),
                       word="invalid")
        _checks.float_dtype(group.get("ns_dtype"), "ns_dtype", where)
        backend = group.get("ns_backend", "torch")
        _checks.choice(backend, "ns_backend", where, NS_BACKENDS, word="invalid")
        if backend == "triton":
            from ..kernels import triton_ns

            triton_ns._require_triton()

    def resolved(self, group, hyper):
        if hyper.get("ns_dtype") is None and group.get("params"):
            hyper = {**hyper, "ns_dtype": default_ns_dtype(group["params"][0].device)}
        return hyper

    def validate_param(self, group, p, describe):
        split = group.get("ns_split")
        if split is None or p.dim() != 2:
            return
        dim = group.get("ns_split_dim", 0)
        size = p.shape[dim]
        what = "rows" if dim == 0 else "columns"
        if isinstance(split, int):
            if size % split:
                raise ValueError(f"ns_split={split} cannot cut the {size} {what} of {describe} into equal blocks; "
                                 "give the block sizes as a tuple, or put this matrix in another group")
        elif sum(split) != size:
            raise ValueError(f"ns_split={tuple(split)} adds up to {sum(split)}, but {describe} has {size} {what}; "
                             "the block sizes must add up to the dimension they cut")

    def ns_cost(self, group, shape):
        if len(shape) != 2:  # DeepSpeed's flat partitions: the flat plan costs the real matrices itself
            return 0.0
        return float(ns_flops_split(tuple(shape), group.get("ns_steps", 5), group.get("ns_split"),
                                    group.get("ns_split_dim", 0)))

    def step(self, opt, group, idx, params, grads, states, steps, gt):
        layout = opt.layout
        mom, nesterov = float(group["momentum"]), group["nesterov"]
        if gt.clip_value is not None or gt.grad_scale is not None:  # else the momentum pass only reads them
            grads = effective_grads(grads, wide_like=params, clip_value=gt.clip_value, grad_scale=gt.grad_scale)
        bufs = states["momentum_buffer"]
        if gt.found_inf is not None:  # a device flag: update copies, write back below where it is clear
            bufs = [b.clone() for b in bufs]
        # bf16 state: the EMA runs on fp32 loads, and the Newton-Schulz input is computed from the fp32
        # value; then the state is stored with the value-keyed stochastic rounding (salt: each parameter's step)
        work = state_precision.load(bufs, copy=False)
        inputs = [muon_momentum(g, m, momentum=mom, nesterov=nesterov) for g, m in zip(grads, work)]
        state_precision.store(bufs, work, step=steps)
        ns_dtype = group["ns_dtype"] or default_ns_dtype(bufs[0].device if bufs else "cpu")
        # .get: groups restored from checkpoints written before ns_backend existed
        ns_backend = group.get("ns_backend", "torch")

        coeffs = group["ns_coefficients"]
        coeffs = coeffs if isinstance(coeffs, str) else tuple(coeffs)

        def ns(batch):
            opt.ns_shapes.extend([tuple(batch.shape[1:])] * batch.shape[0])
            impl = _ns_function(ns_backend, batch)
            return newton_schulz_split(
                batch, lambda x: impl(x, steps=group["ns_steps"], coefficients=coeffs, eps=group["eps"], dtype=ns_dtype),
                ns_split=group.get("ns_split"), ns_split_dim=group.get("ns_split_dim", 0),
                adjust_lr_fn=group["adjust_lr_fn"])

        # the reference NS returns values exact in a narrower ns_dtype: layouts may send them back in it
        exact = ns_dtype if ns_dtype in (torch.bfloat16, torch.float16) and ns_backend == "torch" else None
        outs = layout.orthogonalize(idx, inputs, ns, exact_dtype=exact)
        lr, wd = float(group["lr"]), group["weight_decay"]
        all_params = opt._plan.params  # the plan this step() built (_step_plan)
        news = []
        for i, p, o in zip(idx, params, outs):
            wide = torch.float64 if p.dtype == torch.float64 else torch.float32
            p32 = p.to(wide, copy=gt.found_inf is not None)
            if p.numel():
                if wd != 0:
                    p32.mul_(1.0 - lr * wd)
                pieces = layout.matrix_pieces(i)
                fn = group["adjust_lr_fn"]
                if pieces is None:
                    p32.sub_(o.to(p32.dtype) * adjust_lr(lr, fn, all_params[i].shape))
                else:  # a flat partition holding ranges of several matrices
                    for off, n, shape in pieces:
                        p32[off:off + n].sub_(o[off:off + n].to(p32.dtype) * adjust_lr(lr, fn, shape))
            news.append(p32)
        _gated(gt.found_inf, params, news)
        if gt.found_inf is not None:
            state_precision.gate(gt.found_inf, states["momentum_buffer"], bufs)


class Muon(ShardedOptimizer):
    """Muon for 2-D hidden matrices, plus AdamW/Lion auxiliary groups.

    The positional arguments are ``torch.optim.Muon``'s, in its order; shardopt's
    own options are keyword-only. Groups default to Muon; a group with
    ``"algorithm": "adamw"`` or ``"lion"`` (and that algorithm's hyperparameters)
    holds the non-matrix parameters. The momentum buffer is the EMA
    torch.optim.Muon keeps, so state_dicts move between the two.
    ``ns_dtype`` picks the Newton-Schulz precision (default bf16, as torch's, except fp32 on a CPU
    without a bf16 matmul, where bf16 is ~50x slower: :func:`default_ns_dtype`).
    ``ns_coefficients`` is the fixed quintic ``(a, b, c)`` or ``"polar_express"``
    (the per-iteration schedule of Amsel et al. 2025). ``ns_split`` (a group
    option) orthogonalizes blocks of each matrix on their own: an int k cuts
    ``ns_split_dim`` (0: rows, 1: columns) into k equal blocks (3 for a fused
    QKV, the number of heads for per-head NS), a tuple gives the block sizes.
    ``ns_backend`` picks its implementation: ``"torch"`` (default, the
    reference), ``"triton"`` (:mod:`shardopt.kernels.triton_ns`; CPU tensors
    need ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA when it imports).
    """

    algorithm = "muon"

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=DEFAULT_NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 ns_dtype=None, ns_backend="torch", ns_split=None, ns_split_dim=0, **kwargs):
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                 ns_coefficients=_tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                 ns_dtype=ns_dtype, ns_backend=ns_backend, ns_split=_tuple(ns_split), ns_split_dim=ns_split_dim),
            **kwargs,
        )


def muon_param_groups(model: torch.nn.Module, *, aux_algorithm: str = "adamw", aux_lr=None, aux_betas=None,
                      aux_weight_decay=None, aux_eps=None, muon=None, aux=None, ns_split=None,
                      **muon_group_kwargs) -> list[dict]:
    """Split ``model``'s trainable parameters into a Muon group and an auxiliary group.

    Muon takes 2-D weights of hidden layers. Embeddings (``nn.Embedding``), the
    output head (a Linear named ``lm_head``/``head``/``output``/``classifier``
    or tied to an embedding), norms and biases go to the aux group, run by
    ``aux_algorithm`` (``"adamw"`` or ``"lion"``). ``muon`` / ``aux`` are lists
    of name substrings that force a parameter into that group (``aux`` wins).
    ``ns_split`` maps name substrings to a block split (``{"qkv": 3}``) or to
    group options (``{"attn.proj": {"ns_split": 4, "ns_split_dim": 1}}``): the
    Muon matrices whose names contain one get a Muon group of their own, after
    the main and the aux group. Groups carry ``param_names`` so errors and
    checkpoints use FQNs.
    """
    if aux_algorithm not in ("adamw", "lion"):
        raise ValueError(f"aux_algorithm must be 'adamw' or 'lion', got {aux_algorithm!r}")
    force_muon, force_aux = list(muon or []), list(aux or [])
    embed_ids = set()
    head_names = ("lm_head", "head", "output", "classifier", "out_proj_vocab")
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding):
            embed_ids.add(id(mod.weight))
    seen = set()
    mu, mu_names, ax, ax_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in name else ""
        is_head = leaf in head_names or name.split(".")[0] in head_names
        to_muon = p.dim() == 2 and id(p) not in embed_ids and not is_head
        if any(s in name for s in force_muon):
            if p.dim() != 2:
                raise ValueError(f"muon override {name} (shape {tuple(p.shape)}) is not 2-D; Muon takes matrices only")
            to_muon = True
        if any(s in name for s in force_aux):
            to_muon = False
        (mu if to_muon else ax).append(p)
        (mu_names if to_muon else ax_names).append(name)
    split_groups = []
    for sub, spec in (ns_split or {}).items():
        opts = dict(spec) if isinstance(spec, dict) else {"ns_split": spec}
        ks = [k for k, n in enumerate(mu_names) if sub in n]
        if ks:
            split_groups.append({"params": [mu[k] for k in ks], "param_names": [mu_names[k] for k in ks],
                                 "algorithm": "muon", **muon_group_kwargs, **opts})
            mu = [p for k, p in enumerate(mu) if k not in ks]
            mu_names = [n for k, n in enumerate(mu_names) if k not in ks]
    groups = []
    if mu:
        groups.append({"params": mu, "param_names": mu_names, "algorithm": "muon", **muon_group_kwargs})
    if ax:
        g = {"params": ax, "param_names": ax_names, "algorithm": aux_algorithm}
        for k, v in (("lr", aux_lr), ("betas", aux_betas), ("weight_decay", aux_weight_decay), ("eps", aux_eps)):
            if v is not None:
                g[k] = v
        groups.append(g)
    return groups + split_groups
