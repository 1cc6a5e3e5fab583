"""torch.optim's optimizer contract, checked for every row and variant of ``optim_info.INFOS``.

References are independent of shardopt's kernels: torch.optim.AdamW/Muon, and
the DESIGN.md math for Lion. Every check uses fresh random inputs.
"""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import shardopt
from optim_info import CASE_IDS, CASES, INFOS, grads_for, max_rel, params_for, reference_step, torch_kwargs

STEPS = 6


def _build(info, kwargs, params):
    return info.cls(params, **kwargs)


def _train(opt, params, info, k0, k1, scale=1.0):
    for k in range(k0, k1):
        for p, g in zip(params, grads_for(info, k, dtype=params[0].dtype, scale=scale)):
            p.grad = g
        opt.step()


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("info, k", CASES, ids=CASE_IDS)
def test_matches_reference(info, k):
    kwargs = info.variants[k]
    ps = params_for(info)
    p0 = [p.detach().clone() for p in ps]
    rs = _clone(ps)
    opt = _build(info, kwargs, ps)
    ref = info.reference(rs, **torch_kwargs(kwargs))
    # large gradients so that the clipping variants clip
    for step in range(STEPS):
        for p, r, g in zip(ps, rs, grads_for(info, step, scale=3.0)):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        reference_step(info, ref, rs, kwargs)
    if info.displacement:
        err = max_rel([p - a for p, a in zip(ps, p0)], [r - a for r, a in zip(rs, p0)])
    else:
        err = max_rel(ps, rs)
    assert err <= info.tol, (kwargs, err)
    assert all(not torch.equal(p, a) for p, a in zip(ps, p0))  # every parameter moved


def test_per_parameter_step_counts_match_torch_adamw():
    """A parameter that gets gradients on some steps only keeps its own bias correction."""
    info = INFOS[1]
    ps = params_for(info)
    rs = _clone(ps)
    opt = shardopt.AdamW(ps, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(rs, lr=1e-2, weight_decay=0.1)
    for step in range(40):
        for j, (p, r, g) in enumerate(zip(ps, rs, grads_for(info, step))):
            has = (step % (j + 1) == 0) if j else step >= 10  # frozen then unfrozen, and sparse use
            p.grad = g.clone() if has else None
            r.grad = g.clone() if has else None
        opt.step()
        ref.step()
    assert max_rel(ps, rs) <= 1e-6
    for p, r in zip(ps, rs):
        assert opt.state[p]["step"] == int(ref.state[r]["step"])
    assert len({opt.state[p]["step"] for p in ps}) > 2


# ---------------------------------------------------------------- state_dict
@pytest.mark.parametrize("info, k", CASES, ids=CASE_IDS)
def test_state_dict_round_trip_and_determinism(info, k):
    kwargs = info.variants[k]
    ps = params_for(info)
    opt = _build(info, kwargs, ps)
    _train(opt, ps, info, 0, 3)
    sd = opt.state_dict()
    again = opt.state_dict()
    assert sd["param_groups"] == again["param_groups"]
    for i, st in sd["state"].items():
        assert set(st) == set(again["state"][i])
        assert all(torch.equal(v, again["state"][i][key]) for key, v in st.items())
        assert isinstance(st["step"], torch.Tensor) and st["step"].item() == 3.0
    twin_ps = _clone(ps)
    twin = _build(info, kwargs, twin_ps)
    twin.load_state_dict(copy.deepcopy(sd))
    _train(opt, ps, info, 3, 6)
    _train(twin, twin_ps, info, 3, 6)
    for a, b in zip(ps, twin_ps):
        assert torch.equal(a, b)


@pytest.mark.parametrize("info", [i for i in INFOS if i.torch_format], ids=lambda i: i.name)
def test_torch_state_dicts_load_both_ways(info):
    kwargs = dict(lr=1e-2) if info.name == "Muon" else dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    extra = dict(ns_dtype=torch.bfloat16) if info.name == "Muon" else {}
    # torch -> shardopt: train torch, load its state_dict, take one more step with both
    ts = params_for(info)
    theirs = info.reference(ts, **kwargs)
    _train(theirs, ts, info, 0, 4)
    ours_ps = _clone(ts)
    ours = info.cls(ours_ps, **kwargs, **extra)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # state_dict() returns live tensors
    p_before = [p.detach().clone() for p in ts]
    _train(theirs, ts, info, 4, 5)
    _train(ours, ours_ps, info, 4, 5)
    tol = 1e-6 if info.name == "AdamW" else 6e-2  # one Muon step: bf16 NS rounds differently in torch
    assert max_rel([a - b for a, b in zip(ours_ps, p_before)], [a - b for a, b in zip(ts, p_before)]) <= tol
    # shardopt -> torch
    os_ = params_for(info, seed=1)
    ours = info.cls(os_, **kwargs, **extra)
    _train(ours, os_, info, 0, 4)
    theirs_ps = _clone(os_)
    theirs = info.reference(theirs_ps, **kwargs)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    for p, r in zip(os_, theirs_ps):
        for key, v in theirs.state[r].items():
            if key != "step":
                assert torch.equal(v, ours.state[p][key]), key
    p_before = [p.detach().clone() for p in os_]
    _train(ours, os_, info, 4, 5)
    _train(theirs, theirs_ps, info, 4, 5)
    assert max_rel([a - b for a, b in zip(theirs_ps, p_before)], [a - b for a, b in zip(os_, p_before)]) <= tol


def test_load_refuses_another_group_structure_and_is_all_or_nothing():
    info = INFOS[1]
    ps = params_for(info)
    one = shardopt.AdamW(ps, lr=1e-2)
    _train(one, ps, info, 0, 2)
    sd = one.state_dict()
    two_ps = _clone(ps)
    two = shardopt.AdamW([{"params": two_ps[:2]}, {"params": two_ps[2:], "lr": 5e-3, "weight_decay": 0.0}], lr=1e-2)
    with pytest.raises(ValueError, match="1 parameter group.*has 2.*param group 0.*param group 1"):
        two.load_state_dict(sd)
    assert two.param_groups[1]["lr"] == 5e-3 and two.param_groups[1]["weight_decay"] == 0.0
    # a state_dict that fails on its last parameter changes nothing
    good = shardopt.AdamW(_clone(ps), lr=1e-2)
    _train(good, list(good.param_groups[0]["params"]), info, 0, 1)
    before = copy.deepcopy(good.state_dict())
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["lr"] = 0.5
    last = max(bad["state"])
    bad["state"][last]["exp_avg"] = torch.zeros(99)
    with pytest.raises(ValueError, match="local shape"):
        good.load_state_dict(bad)
    after = good.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        assert all(torch.equal(v, after["state"][i][key]) for key, v in st.items())


def test_float_and_int_steps_from_older_state_dicts_load():
    info = INFOS[1]
    ps = params_for(info)
    opt = shardopt.AdamW(ps, lr=1e-2)
    _train(opt, ps, info, 0, 3)
    for step in (3.0, 3, torch.tensor(3.0)):
        sd = copy.deepcopy(opt.state_dict())
        for st in sd["state"].values():
            st["step"] = step
        twin = shardopt.AdamW(_clone(ps), lr=1e-2)
        twin.load_state_dict(sd)
        assert all(st["step"] == 3 and type(st["step"]) is int for st in twin.state.values())
    sd["state"][0]["step"] = 2.5
    with pytest.raises(ValueError, match="whole number"):
        shardopt.AdamW(_clone(ps), lr=1e-2).load_state_dict(sd)


def test_old_muon_momentum_convention_converts_on_load():
    info = INFOS[2]
    ps = params_for(info)
    opt = shardopt.Muon(ps, lr=2e-2, ns_dtype=torch.float32)
    _train(opt, ps, info, 0, 3)
    sd = copy.deepcopy(opt.state_dict())
    # what an older shardopt wrote: no format marker, the sum form m = mu*m + g = EMA / (1 - mu)
    sd.pop("shardopt")
    for g in sd["param_groups"]:
        g.pop("shardopt_format")
    for st in sd["state"].values():
        st["momentum_buffer"] = st["momentum_buffer"] / (1 - 0.95)
    twin_ps = _clone(ps)
    twin = shardopt.Muon(twin_ps, lr=2e-2, ns_dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="old sum form"):
        twin.load_state_dict(sd)
    for p, q in zip(ps, twin_ps):
        torch.testing.assert_close(twin.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    _train(opt, ps, info, 3, 5)
    _train(twin, twin_ps, info, 3, 5)
    assert max_rel(twin_ps, ps) <= 1e-6


# ---------------------------------------------------------------- copies
@pytest.mark.parametrize("info, k", CASES, ids=CASE_IDS)
def test_deepcopy_and_pickle_keep_every_setting(info, k):
    kwargs = info.variants[k]
    ps = params_for(info)
    opt = _build(info, kwargs, ps)
    _train(opt, ps, info, 0, 2)
    for how in ("deepcopy", "pickle"):
        cps, copt = copy.deepcopy((ps, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((ps, opt)))
        for attr in ("sharding", "backend", "nonfinite", "grad_clip_norm", "grad_clip_value", "master_weights"):
            assert getattr(copt, attr) == getattr(opt, attr), (how, attr)
        assert copt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert all(copt.state[c]["step"] == 2 for c in cps)
        tps = _clone(ps)
        top = _build(info, kwargs, tps)
        top.load_state_dict(opt.state_dict())
        _train(copt, cps, info, 2, 4)
        _train(top, tps, info, 2, 4)
        for a, b in zip(cps, tps):
            assert torch.equal(a, b), how
        assert not any(torch.equal(a, b) for a, b in zip(cps, ps))  # the original did not move


# ---------------------------------------------------------------- hooks
def test_hooks_run():
    info = INFOS[0]
    ps = params_for(info)
    opt = shardopt.Lion(ps, lr=1e-2)
    seen = []
    opt.register_step_pre_hook(lambda o, a, kw: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, kw: seen.append("post"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (seen.append("sd_post"), sd.update(tag=1))[1])
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    _train(opt, ps, info, 0, 1)
    sd = opt.state_dict()
    assert sd["tag"] == 1
    opt.load_state_dict(sd)
    assert seen == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


# ---------------------------------------------------------------- steps that must change nothing
@pytest.mark.parametrize("info, k", CASES, ids=CASE_IDS)
def test_zero_grads_are_a_no_op_without_weight_decay(info, k):
    kwargs = dict(info.variants[k], weight_decay=0.0)
    ps = params_for(info)
    opt = _build(info, kwargs, ps)
    before = [p.detach().clone() for p in ps]
    for _ in range(3):
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()
    for a, b in zip(ps, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("info, k", CASES, ids=CASE_IDS)
def test_params_without_grad_are_untouched(info, k):
    kwargs = dict(info.variants[k], weight_decay=0.1)
    ps = params_for(info)
    opt = _build(info, kwargs, ps)
    frozen = ps[1]
    before = frozen.detach().clone()
    for step in range(3):
        for j, (p, g) in enumerate(zip(ps, grads_for(info, step))):
            p.grad = None if j == 1 else g
        opt.step()
    assert torch.equal(frozen, before)
    assert opt.state[frozen]["step"] == 0 and opt.state[ps[0]]["step"] == 3


@pytest.mark.parametrize("info, k", CASES, ids=CASE_IDS)
def test_grads_are_never_modified_in_place(info, k):
    kwargs = info.variants[k]
    ps = params_for(info)
    opt = _build(info, kwargs, ps)
    for step in range(2):
        gs = grads_for(info, step, scale=5.0)
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(ps, gs):
            assert torch.equal(p.grad, g)


# ---------------------------------------------------------------- inputs
@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_bad_inputs_are_value_errors_naming_the_group(info):
    for kwargs, match in info.bad_inputs:
        with pytest.raises(ValueError, match=match):
            info.cls(params_for(info), **kwargs)
        # add_param_group validates the same way, before looking at the parameters
        opt = info.cls(params_for(info))
        group_kwargs = {k: v for k, v in kwargs.items() if k in info.cls([torch.nn.Parameter(torch.zeros(2, 2))]).defaults}
        if group_kwargs:
            with pytest.raises(ValueError, match="param group 1"):
                opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, 3))], **group_kwargs})


def test_positional_arguments_follow_torch():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    m = shardopt.Muon(p, 0.02, 0.01)
    ref = torch.optim.Muon([torch.nn.Parameter(torch.randn(4, 4))], 0.02, 0.01)
    for key in ("lr", "weight_decay", "momentum", "nesterov", "eps", "ns_steps"):
        assert m.param_groups[0][key] == ref.param_groups[0][key], key
    a = shardopt.AdamW(p, 1e-3, (0.8, 0.9), 1e-6, 0.05, True)
    assert a.param_groups[0]["amsgrad"] is True and a.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(TypeError):
        shardopt.AdamW(p, 1e-3, (0.8, 0.9), 1e-6, 0.05, True, False)  # maximize is keyword-only, as in torch
    with pytest.raises(TypeError):
        shardopt.Lion(p, 1e-4, (0.9, 0.99), 0.0, "torch")  # backend is keyword-only


@pytest.mark.parametrize("info", [i for i in INFOS if not i.matrix_only], ids=lambda i: i.name)
def test_non_contiguous_and_channels_last_params(info):
    kwargs = dict(info.variants[1])
    g = torch.Generator().manual_seed(3)
    conv = torch.randn(8, 3, 3, 3, generator=g).to(memory_format=torch.channels_last)
    tall = torch.randn(6, 9, generator=g).t()  # a transposed view
    ps = [torch.nn.Parameter(conv), torch.nn.Parameter(tall)]
    assert not ps[0].is_contiguous() and not ps[1].is_contiguous()
    twins = [torch.nn.Parameter(p.detach().contiguous()) for p in ps]
    a = info.cls(ps, **kwargs)  # the default backend: the C++ kernels on CPU
    b = info.cls(twins, **kwargs, backend="torch")
    for step in range(3):
        gg = torch.Generator().manual_seed(50 + step)
        gs = [torch.randn(p.shape, generator=gg) for p in ps]
        for p, t, x in zip(ps, twins, gs):
            p.grad = x.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else x
            t.grad = x.clone()
        a.step()
        b.step()
    for p, t in zip(ps, twins):
        assert torch.equal(p.detach().contiguous(), t.detach()) if info.name == "Lion" else \
            max_rel([p.detach().contiguous()], [t.detach()]) <= 1e-6
    assert ps[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("info", [i for i in INFOS if i.supports_complex], ids=lambda i: i.name)
def test_complex_params_follow_their_real_view(info):
    kwargs = dict(info.variants[1])
    g = torch.Generator().manual_seed(4)
    c = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex64, generator=g))
    r = torch.nn.Parameter(torch.view_as_real(c.detach()).clone())
    a = info.cls([c], **kwargs)
    b = info.cls([r], **kwargs)
    for step in range(3):
        gg = torch.randn(5, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(60 + step))
        c.grad, r.grad = gg, torch.view_as_real(gg).clone()
        a.step()
        b.step()
    assert torch.equal(torch.view_as_real(c.detach()), r.detach())
    assert a.state[c][next(k for k in a.state[c] if k != "step")].dtype == torch.complex64


@pytest.mark.parametrize("info", [i for i in INFOS if i.torch_format or i.name == "Lion"], ids=lambda i: i.name)
def test_float64_params_compute_in_float64(info):
    kwargs = dict(lr=1e-2) if info.name != "Lion" else dict(lr=1e-2, weight_decay=0.1)
    ps = params_for(info, dtype=torch.float64)
    rs = _clone(ps)
    opt = info.cls(ps, **kwargs, **({"ns_dtype": torch.float64} if info.name == "Muon" else {}))
    ref = info.reference(rs, **kwargs)
    for step in range(4):
        for p, r, x in zip(ps, rs, grads_for(info, step, dtype=torch.float64)):
            p.grad, r.grad = x.clone(), x.clone()
        opt.step()
        ref.step()
    assert all(p.dtype == torch.float64 for p in ps)
    tol = 1e-12 if info.name != "Muon" else 3e-2  # torch's Muon runs NS in bf16
    assert max_rel(ps, rs) <= tol


def test_nonfinite_skip_leaves_params_and_state_and_counts():
    info = INFOS[1]
    ps = params_for(info)
    opt = shardopt.AdamW(ps, lr=1e-2)
    _train(opt, ps, info, 0, 2)
    before = copy.deepcopy(opt.state_dict())
    snap = [p.detach().clone() for p in ps]
    for p, x in zip(ps, grads_for(info, 9)):
        p.grad = x
    ps[2].grad[0, 0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(ps, snap))
    after = opt.state_dict()
    for i, st in before["state"].items():
        assert all(torch.equal(v, after["state"][i][key]) for key, v in st.items())
