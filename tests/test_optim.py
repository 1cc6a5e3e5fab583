"""Single-device optimizers against independent references (DESIGN.md math, torch.optim)."""
from __future__ import annotations

import copy

import pytest
import torch

import shardopt
from shardopt import functional as F
from cases import CASE_IDS, build, make_grads, make_params


# ---------------------------------------------------------------- Lion
def test_lion_worked_example():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = shardopt.Lion([p], lr=0.01, backend="torch")
    p.grad = torch.tensor([0.1])
    opt.step()
    assert p.item() == pytest.approx(0.99, abs=1e-7)
    assert opt.state[p]["momentum_buffer"].item() == pytest.approx(0.001, abs=1e-9)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lion_sign_zero_leaves_coordinate(backend):
    p = torch.nn.Parameter(torch.randn(9))
    before = p.detach().clone()
    opt = shardopt.Lion([p], lr=0.1, weight_decay=0.5, backend=backend)
    g = torch.randn(9)
    g[3] = 0.0
    p.grad = g
    opt.step()
    # only decay moves the zero-gradient, zero-momentum coordinate: p - lr*wd*p
    assert p[3].item() == pytest.approx(before[3].item() * (1 - 0.1 * 0.5), rel=1e-6)
    assert opt.state[p]["momentum_buffer"][3].item() == 0.0
    # the rest moved by lr*(sign(g) + wd*p), as DESIGN.md states
    torch.testing.assert_close(p.detach(), before - 0.1 * (torch.sign(g) + 0.5 * before))


def test_lion_many_steps_bitwise_vs_reference():
    ps = make_params()
    ref = [p.detach().clone() for p in ps]
    ref_m = [torch.zeros_like(p) for p in ps]
    opt = shardopt.Lion(ps, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.2, backend="torch")
    for k in range(30):
        gs = make_grads(k)
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        F.lion(ref, gs, ref_m, lr=3e-3, beta1=0.8, beta2=0.95, weight_decay=0.2)
    for p, r, m in zip(ps, ref, ref_m):
        assert torch.equal(p.detach(), r)
        assert torch.equal(opt.state[p]["momentum_buffer"], m)


def test_lion_grad_clip_norm_and_value():
    ps = make_params()
    gs = [g * 10 for g in make_grads(0)]
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in gs)).item()
    # norm clipping: the step sees g * max_norm/(norm + 1e-6)
    opt = shardopt.Lion(ps, lr=0.01, grad_clip_norm=1.0, backend="torch")
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    opt.step()
    assert opt.last_grad_norm == pytest.approx(total, rel=1e-6)
    coef = 1.0 / (total + 1e-6)
    for p, g in zip(ps, gs):
        expect = (1 - 0.99) * (g * coef)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], expect, rtol=1e-5, atol=1e-9)
    # value clipping: elementwise clamp to [-v, v]
    ps2 = make_params()
    opt2 = shardopt.Lion(ps2, lr=0.01, grad_clip_value=0.5, backend="torch")
    for p, g in zip(ps2, gs):
        p.grad = g.clone()
    opt2.step()
    for p, g in zip(ps2, gs):
        torch.testing.assert_close(opt2.state[p]["momentum_buffer"], (1 - 0.99) * g.clamp(-0.5, 0.5))
    # a norm below the threshold is left alone
    ps3 = make_params()
    opt3 = shardopt.Lion(ps3, lr=0.01, grad_clip_norm=1e6, backend="torch")
    for p, g in zip(ps3, gs):
        p.grad = g.clone()
    opt3.step()
    for p, g in zip(ps3, gs):
        torch.testing.assert_close(opt3.state[p]["momentum_buffer"], (1 - 0.99) * g)


# ---------------------------------------------------------------- AdamW
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_adamw_matches_torch(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))
    ref = copy.deepcopy(model)
    groups = lambda m: [  # noqa: E731
        {"params": [m[0].weight, m[2].weight]},
        {"params": [m[0].bias, m[2].bias], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)},
    ]
    ours = shardopt.AdamW(groups(model), lr=1e-2, weight_decay=0.1, backend=backend)
    theirs = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.1)
    s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=10, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(theirs, step_size=10, gamma=0.5)
    for _ in range(50):
        x = torch.randn(8, 16)
        for m, o, s in ((model, ours, s1), (ref, theirs, s2)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
            s.step()
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] == 1e-2 * 0.5**5
    for a, b in zip(model.parameters(), ref.parameters()):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 1e-6, rel


# ---------------------------------------------------------------- Muon
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(32, 16), (12, 40)])
def test_muon_matches_torch_muon(nesterov, adjust, shape):
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(shape))
    W2 = torch.nn.Parameter(W.detach().clone())
    W0 = W.detach().clone()
    ours = shardopt.Muon([W], lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust, ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon([W2], lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    for _ in range(10):
        g = torch.randn(shape)
        W.grad, W2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    # both orthogonalize in bf16: ~1% of the update per step is bf16 noise
    rel = ((W - W2).norm() / (W2 - W0).norm()).item()
    assert rel < 3e-2, rel


@pytest.mark.parametrize("bf16_matmul", [True, False])
def test_muon_default_ns_dtype_follows_the_cpu(monkeypatch, bf16_matmul):
    """ns_dtype=None: bf16 (as torch's) on accelerators and on CPUs with a bf16 matmul, fp32 on the
    others; the step then equals the one with that dtype given, and ranks compare the resolved one."""
    from shardopt.optim import muon as muon_mod

    monkeypatch.setattr(muon_mod, "_cpu_has_bf16_matmul", lambda: bf16_matmul)
    want = torch.bfloat16 if bf16_matmul else torch.float32
    assert muon_mod.default_ns_dtype("cpu") == want
    assert muon_mod.default_ns_dtype(torch.device("cuda", 0)) == torch.bfloat16
    torch.manual_seed(4)
    W = torch.nn.Parameter(torch.randn(24, 40))
    W2, W3 = (torch.nn.Parameter(W.detach().clone()) for _ in range(2))
    W0 = W.detach().clone()
    default = shardopt.Muon([W], lr=0.02)
    given = shardopt.Muon([W2], lr=0.02, ns_dtype=want)
    theirs = torch.optim.Muon([W3], lr=0.02)
    for _ in range(4):
        g = torch.randn(24, 40)
        W.grad, W2.grad, W3.grad = g.clone(), g.clone(), g.clone()
        default.step(), given.step(), theirs.step()
    assert torch.equal(W, W2)
    assert default.param_groups[0]["ns_dtype"] is None  # saved as the user left it
    assert repr(want) in default._group_signature(0)
    # the user's default stays within torch.optim.Muon's bf16 noise of it
    rel = ((W - W3).norm() / (W3 - W0).norm()).item()
    assert rel < 3e-2, rel


def test_newton_schulz_singular_values_in_quintic_band():
    torch.manual_seed(0)
    G = torch.randn(48, 96) * torch.logspace(-1, 1, 48)[:, None]  # condition number ~100
    s_in = torch.linalg.svdvals(G)
    assert s_in.max() / s_in.min() > 50
    s = torch.linalg.svdvals(F.newton_schulz(G, dtype=torch.float32))
    # the quintic (3.4445, -4.7750, 2.0315) maps every singular value into about [0.68, 1.2]
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())


def test_newton_schulz_transposes_tall_matrices():
    torch.manual_seed(0)
    G = torch.randn(40, 12)
    X = F.newton_schulz(G)
    assert X.shape == (40, 12)
    assert torch.equal(X, F.newton_schulz(G.T.contiguous()).T)
    # and the columns, not the rows, come out orthonormal-ish
    s = torch.linalg.svdvals(X)
    assert s.numel() == 12 and s.min() > 0.6 and s.max() < 1.25


def test_muon_param_groups_split_and_override():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.fc1 = torch.nn.Linear(16, 32)
            self.norm = torch.nn.LayerNorm(32)
            self.fc2 = torch.nn.Linear(32, 16)
            self.lm_head = torch.nn.Linear(16, 50, bias=False)

    m = Tiny()
    groups = shardopt.muon_param_groups(m)
    names = {g["algorithm"]: set(g["param_names"]) for g in groups}
    assert names["muon"] == {"fc1.weight", "fc2.weight"}
    assert names["adamw"] == {"embed.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.bias", "lm_head.weight"}
    g2 = shardopt.muon_param_groups(m, aux_algorithm="lion", aux=["fc2"], muon=["lm_head"])
    names = {g["algorithm"]: set(g["param_names"]) for g in g2}
    assert names["muon"] == {"fc1.weight", "lm_head.weight"}
    assert "fc2.weight" in names["lion"]
    opt = shardopt.Muon(groups, lr=0.01)
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "adamw"]
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)  # the aux algorithm's defaults


# ---------------------------------------------------------------- torch.optim behaviour
@pytest.mark.parametrize("name", CASE_IDS)
def test_state_dict_round_trip_and_zero_grad(name):
    ps = make_params()
    opt = build(name, ps, backend="torch")
    for k in range(3):
        for p, g in zip(ps, make_grads(k)):
            p.grad = g
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = build(name, ps2, backend="torch")
    opt2.load_state_dict(sd)
    for p in ps2:
        for k, v in opt2.state[p].items():
            if k != "step":
                assert v.dtype == torch.float32
    for k in range(3, 6):
        for o, pl in ((opt, ps), (opt2, ps2)):
            for p, g in zip(pl, make_grads(k)):
                p.grad = g
            o.step()
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_state_is_eager_and_fp32_for_bf16_params():
    ps = make_params(torch.bfloat16)
    opt = shardopt.AdamW(ps, backend="torch")
    for p in ps:
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq", "master_param"}
        assert st["exp_avg"].dtype == torch.float32 and st["master_param"].dtype == torch.float32
        assert torch.equal(st["master_param"].bfloat16(), p.detach())


def test_bf16_params_follow_fp32_master():
    ps = make_params(torch.bfloat16)
    ref = [p.detach().float().clone() for p in ps]
    m = [torch.zeros_like(r) for r in ref]
    opt = shardopt.Lion(ps, lr=1e-3, weight_decay=0.1, backend="torch")
    for k in range(5):
        gs = make_grads(k, dtype=torch.bfloat16)
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        F.lion(ref, gs, m, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
    for p, r in zip(ps, ref):
        assert torch.equal(opt.state[p]["master_param"], r)
        assert torch.equal(p.detach(), r.bfloat16())


def test_nonfinite_skip_and_raise_leave_state_untouched():
    ps = make_params()
    opt = shardopt.AdamW(ps, backend="torch", nonfinite="skip")
    for p, g in zip(ps, make_grads(0)):
        p.grad = g
    opt.step()
    snap = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in ps]
    gs = make_grads(1)
    gs[2][0, 0] = float("nan")
    for p, g in zip(ps, gs):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(ps, before))
    for i, st in snap["state"].items():
        for k, v in st.items():
            assert torch.equal(opt.state_dict()["state"][i][k], v)
    opt.nonfinite = "raise"
    gs[2][0, 0] = float("inf")
    with pytest.raises(shardopt.NonFiniteGradientError, match="non-finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, before))


# ---------------------------------------------------------------- bad input
def _muon_with_bias():
    lin = torch.nn.Linear(4, 4)
    return shardopt.Muon([lin.weight, lin.bias])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: shardopt.Lion([torch.nn.Parameter(torch.randn(3))], lr=-1.0), "learning rate"),
        (lambda: shardopt.AdamW([torch.nn.Parameter(torch.randn(3))], lr=-1e-3), "learning rate"),
        (lambda: shardopt.Lion([torch.nn.Parameter(torch.randn(3))], betas=(0.9, 1.0)), "betas"),
        (lambda: shardopt.AdamW([torch.nn.Parameter(torch.randn(3))], betas=(-0.1, 0.9)), "betas"),
        (_muon_with_bias, r"params'\]\[1\] \(shape \(4,\)\) is 1-D"),
        (lambda: shardopt.Lion([torch.nn.Parameter(torch.randn(3))], backend="fast"), "unknown backend"),
        (lambda: shardopt.Muon([torch.nn.Parameter(torch.randn(3, 3))], adjust_lr_fn="x"), "adjust_lr_fn"),
        (lambda: shardopt.Lion([torch.nn.Parameter(torch.randn(3))], sharding="zero3"), "unknown sharding"),
        (lambda: shardopt.Lion([{"params": [torch.nn.Parameter(torch.randn(3))], "algorithm": "sgd"}]), "unknown algorithm"),
    ],
)
def test_bad_input_raises_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_named_parameters_appear_in_errors():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"bias \(shape \(4,\)\)"):
        shardopt.Muon([{"params": [lin.weight, lin.bias], "param_names": ["weight", "bias"]}])


def test_sparse_gradient_rejected_naming_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = shardopt.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"sparse gradients.*shape \(10, 4\)"):
        opt.step()


# ---------------------------------------------------------------- summary()
@pytest.mark.parametrize("name", ["lion", "adamw", "muon"])
def test_summary_prints_human_units_and_only_meaningful_columns(name):
    ps = make_params()
    opt = build(name, ps, backend="torch")
    lines = []
    rows = opt.summary(print_fn=lines.append)
    assert [sorted(r) for r in rows] == [sorted(["rank", "owned_elements", "state_bytes", "ns_flops",
                                                 "unsharded_state_bytes", "layout"])]
    r = rows[0]
    assert r["state_bytes"] == opt.state_bytes() == r["unsharded_state_bytes"] and r["layout"] == "none"
    assert lines[0] == f"{type(opt).__name__} layout=none world=1"
    header, row = lines[1].split(), lines[2].split()
    # the NS column only where there is Newton-Schulz work; bytes in B/KiB/MiB, not raw
    assert ("NS" in header) == (name == "muon"), lines
    kib = f"{r['state_bytes'] / 1024:.1f}"
    assert row[:5] == ["0", f"{r['owned_elements']:,}", kib, "KiB", "100%"], lines
    if name == "muon":
        assert r["ns_flops"] > 0 and row[5:] == [f"{r['ns_flops'] / 1e3:.1f}", "k"], lines
    assert lines[-1].startswith("without sharding, each rank would hold ")
