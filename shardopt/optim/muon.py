"""Muon: momentum, then Newton-Schulz orthogonalization of each full 2-D matrix.

Hidden 2-D matrices go in Muon groups; embeddings, the output head, norms and
biases go in auxiliary groups (``{"algorithm": "adamw"}`` or ``"lion"``), which
:func:`muon_param_groups` builds from a model.
"""
from __future__ import annotations

import torch

from ..functional import adjust_lr, muon_momentum, newton_schulz
from ..functional.muon import DEFAULT_NS_COEFFICIENTS
from .base import Algorithm, ShardedOptimizer, register

NS_BACKENDS = ("torch", "triton", "auto")


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
    state_keys = ("momentum_buffer",)
    defaults = {
        "lr": 1e-3, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "ns_coefficients": DEFAULT_NS_COEFFICIENTS,
        "eps": 1e-7, "weight_decay": 0.1, "adjust_lr_fn": None, "ns_dtype": None,
        "ns_backend": "torch",
    }

    def validate(self, group, describe):
        super().validate(group, describe)
        m = group.get("momentum")
        if not 0.0 <= m < 1.0:
            raise ValueError(f"invalid momentum {m!r} for the Muon group of {describe(0)}: it must lie in [0, 1)")
        if group.get("adjust_lr_fn") not in (None, "original", "match_rms_adamw"):
            raise ValueError(
                f"invalid adjust_lr_fn {group.get('adjust_lr_fn')!r}: use None, 'original' or 'match_rms_adamw'"
            )
        if not (isinstance(group.get("ns_steps"), int) and 0 < group["ns_steps"] < 100):
            raise ValueError(f"invalid ns_steps {group.get('ns_steps')!r}: use an int in [1, 100)")
        if len(tuple(group.get("ns_coefficients", ()))) != 3:
            raise ValueError("ns_coefficients must be three numbers (a, b, c)")
        backend = group.get("ns_backend", "torch")
        if backend not in NS_BACKENDS:
            raise ValueError(
                f"invalid ns_backend {backend!r} for the Muon group of {describe(0)}: "
                f"valid: {', '.join(repr(b) for b in NS_BACKENDS)}"
            )
        if backend == "triton":
            from ..kernels import triton_ns

            triton_ns._require_triton()

    def step(self, opt, group, idx, params, grads, states, step):
        layout = opt.layout
        mom, nesterov = group["momentum"], group["nesterov"]
        inputs = [muon_momentum(g, m, momentum=mom, nesterov=nesterov) for g, m in zip(grads, states["momentum_buffer"])]
        ns_dtype = group["ns_dtype"]
        # .get: groups restored from checkpoints written before ns_backend existed
        ns_backend = group.get("ns_backend", "torch")

        def ns(batch):
            dtype = ns_dtype or (torch.bfloat16 if batch.is_cuda else torch.float32)
            opt.ns_shapes.extend([tuple(batch.shape[1:])] * batch.shape[0])
            return _ns_function(ns_backend, batch)(
                batch, steps=group["ns_steps"], coefficients=tuple(group["ns_coefficients"]), eps=group["eps"],
                dtype=dtype,
            )

        outs = layout.orthogonalize(idx, inputs, ns)
        lr, wd = float(group["lr"]), group["weight_decay"]
        all_params, _, _ = opt._flat_params()
        for i, p, o in zip(idx, params, outs):
            if p.numel() == 0:
                continue
            p32 = p if p.dtype == torch.float32 else p.float()
            if wd != 0:
                p32.mul_(1.0 - lr * wd)
            p32.sub_(o.to(p32.dtype) * adjust_lr(lr, group["adjust_lr_fn"], all_params[i].shape))
            if p32 is not p:
                p.copy_(p32)


class Muon(ShardedOptimizer):
    """Muon for 2-D hidden matrices, plus AdamW/Lion auxiliary groups.

    Groups default to Muon; a group with ``"algorithm": "adamw"`` or ``"lion"``
    (and that algorithm's hyperparameters) holds the non-matrix parameters.
    ``ns_dtype`` picks the Newton-Schulz precision (default: bf16 on CUDA, fp32 on CPU).
    ``ns_backend`` picks its implementation: ``"torch"`` (default, the
    reference), ``"triton"`` (:mod:`shardopt.kernels.triton_ns`; CPU tensors
    need ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA when it imports).
    """

    algorithm = "muon"

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, ns_steps=5,
                 ns_coefficients=DEFAULT_NS_COEFFICIENTS, eps=1e-7, weight_decay=0.1, adjust_lr_fn=None,
                 ns_dtype=None, ns_backend="torch", **kwargs):
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                 ns_coefficients=tuple(ns_coefficients), eps=eps, weight_decay=weight_decay,
                 adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, ns_backend=ns_backend),
            **kwargs,
        )


def muon_param_groups(model: torch.nn.Module, *, aux_algorithm: str = "adamw", aux_lr=None, aux_betas=None,
                      aux_weight_decay=None, aux_eps=None, muon=None, aux=None, **muon_group_kwargs) -> list[dict]:
    """Split ``model``'s trainable parameters into a Muon group and an auxiliary group.

    Muon takes 2-D weights of hidden layers. Embeddings (``nn.Embedding``), the
    output head (a Linear named ``lm_head``/``head``/``output``/``classifier``
    or tied to an embedding), norms and biases go to the aux group, run by
    ``aux_algorithm`` (``"adamw"`` or ``"lion"``). ``muon`` / ``aux`` are lists
    of name substrings that force a parameter into that group (``aux`` wins).
    Groups carry ``param_names`` so errors and checkpoints use FQNs.
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
    groups = []
    if mu:
        groups.append({"params": mu, "param_names": mu_names, "algorithm": "muon", **muon_group_kwargs})
    if ax:
        g = {"params": ax, "param_names": ax_names, "algorithm": aux_algorithm}
        for k, v in (("lr", aux_lr), ("betas", aux_betas), ("weight_decay", aux_weight_decay), ("eps", aux_eps)):
            if v is not None:
                g[k] = v
        groups.append(g)
    return groups
