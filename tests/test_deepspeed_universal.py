"""DeepSpeed checkpoints across world sizes (issue 14): ZeRO-1/2/3 -> shardopt -> DeepSpeed universal.

Two spawned jobs. At W=2 DeepSpeed engines train two steps, save, and train two
more (the uninterrupted run): shardopt's Lion, AdamW and Muon at ZeRO-2 and
ZeRO-3, and DeepSpeed's own AdamW (ZeRO-3), Muon (ZeRO-2 and 3) and Lion
(ZeRO-2 with offload, the only place its CPU Lion runs). The parent converts
every save with ``shardopt ckpt convert --from deepspeed`` and writes DeepSpeed
universal checkpoints with ``--to deepspeed-universal``. At W=4 fresh engines
(``"checkpoint": {"load_universal": true}``) and FSDP2 models load them and
train the last two steps, which must equal the uninterrupted run; the same
W=4 job checks Muon at ZeRO-2/3 against the single-process optimizer.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

pytest.importorskip("deepspeed")

import dist_utils  # noqa: E402
import test_deepspeed as T  # noqa: E402
import shardopt  # noqa: E402
from shardopt.checkpoint import ds_convert, offline  # noqa: E402

DS_MUON = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.05}
DS_LION = {"lr": 2e-3, "betas": [0.9, 0.99], "weight_decay": 0.0}
OURS = {f"{a}-z{s}": T.Case(f"{a}-z{s}", f"shardopt.{n}", s, kw)
        for s in (2, 3) for a, n, kw in (("lion", "Lion", T.LION), ("adamw", "AdamW", T.ADAMW), ("muon", "Muon", T.MUON))}
THEIRS = {
    "ds-adamw-z3": T.Case("ds-adamw-z3", "AdamW", 3, {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}),
    "ds-muon-z2": T.Case("ds-muon-z2", "Muon", 2, DS_MUON),
    "ds-muon-z3": T.Case("ds-muon-z3", "Muon", 3, DS_MUON),
    "ds-lion-z2": T.Case("ds-lion-z2", "Lion", 2, DS_LION, offload=True),
}
SAVES = {**OURS, **THEIRS}
W4_EQUIVALENCE = [dataclasses.replace(T.BY_NAME[n], world=4) for n in ("muon-z2", "muon-z3")]
FSDP2_RESUMES = ["lion-z2", "adamw-z3", "muon-z3", "muon-z2-live"]
# DeepSpeed's Muon tags every 2-D weight but embeddings and lm_head, so its group holds head.weight:
# shardopt.Muon takes it into the Muon group by name to have the same groups
OURS_FROM_DS_MUON = T.Case("ours-from-ds-muon", "shardopt.Muon", 2,
                           dict(T.MUON, muon=["head.weight"], momentum=0.9, lr=0.02, weight_decay=0.05,
                                aux_lr=0.02, aux_weight_decay=0.05, aux_betas=[0.9, 0.95], aux_eps=1e-10))


def _config(case, world, universal=False):
    cfg = dataclasses.replace(case, world=world).config()
    if case.type == "Muon" and case.stage == 3:
        cfg["zero_optimization"]["reduce_scatter"] = False  # DeepSpeed: "Muon and reduce scatter cannot be used together"
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def _engine(case, world, seed=0, universal=False):
    import deepspeed

    model = T.make_model(seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=_config(case, world, universal))
    return engine


def _job_w2(rank, world, root):
    import shardopt.deepspeed  # noqa: F401

    out = {}
    for name, case in SAVES.items():
        e = _engine(case, world)
        T._train(e, rank, range(2), False)
        e.save_checkpoint(os.path.join(root, "ds", name), tag="t2")
        if name == "muon-z2":  # shardopt's own save of a ZeRO-2 engine with Muon in DeepSpeed's partitions
            import shardopt.checkpoint as C

            C.save(os.path.join(root, "conv", "muon-z2-live"), e)
        T._train(e, rank, range(2, T.STEPS), False)
        out[name] = T._full_params(e)
    return out


def _fsdp2_resume(rank, world, name, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import shardopt.checkpoint as C

    case = OURS[name.removesuffix("-live")]
    model = T.make_model(seed=1)  # everything must come from the checkpoint
    mesh = init_device_mesh("cpu", (world,))
    for m in (model.fc1, model.fc2, model.fc3, model.fc4, model.head):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in case.params.items()}
    if case.algorithm == "muon":
        aux, rest = T._split_aux(params)
        rest["ns_dtype"] = torch.float32
        opt = shardopt.Muon(shardopt.muon_param_groups(model, **aux), **rest)
    else:
        opt = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[case.algorithm](model.parameters(), **params)
    C.load(path, model, opt)
    m = T.micro(world)
    for s in range(2, T.STEPS):
        x, y = T.batch(s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank * m:(rank + 1) * m]), y[rank * m:(rank + 1) * m]).backward()
        opt.step()
    full = {}
    for n, p in model.named_parameters():
        full[n] = p.full_tensor().detach().clone()
    return full, opt.layout.name


def _job_w4(rank, world, root):
    import shardopt.deepspeed  # noqa: F401
    import shardopt.optim.muon as muon_mod

    out = {"resumed": {}, "equivalence": {}, "fsdp2": {}}
    for name, case in {**OURS, "ds-lion-z2": THEIRS["ds-lion-z2"]}.items():
        e = _engine(case, world, seed=1, universal=True)  # other initial weights: all must come from the file
        path, _ = e.load_checkpoint(os.path.join(root, "uni", name))
        assert path is not None
        T._train(e, rank, range(2, T.STEPS), False)
        out["resumed"][name] = T._full_params(e)
    # the optimizer state matters: the same checkpoint with the moments zeroed after loading
    e = _engine(OURS["muon-z3"], world, seed=1, universal=True)
    e.load_checkpoint(os.path.join(root, "uni", "muon-z3"))
    for st in e.basic_optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                v.zero_()
    T._train(e, rank, range(2, T.STEPS), False)
    out["resumed"]["muon-z3-weights-only"] = T._full_params(e)
    # DeepSpeed's own Muon (ZeRO-2) carried on by shardopt.Muon at ZeRO-3
    e = _engine(dataclasses.replace(OURS_FROM_DS_MUON, stage=3), world, seed=1, universal=True)
    e.load_checkpoint(os.path.join(root, "uni", "ds-muon-z2"))
    T._train(e, rank, range(2, T.STEPS), False)
    out["resumed"]["ds-muon-z2"] = T._full_params(e)
    # Muon at W=4 against the single-process optimizer, and its NS count
    real_ns, calls = muon_mod.newton_schulz, []

    def counting(batch, **kw):
        calls.append(tuple(batch.shape))
        return real_ns(batch, **kw)

    muon_mod.newton_schulz = counting
    for case in W4_EQUIVALENCE:
        e = _engine(case, world)
        ns = []
        for s in range(T.STEPS):
            calls.clear()
            T._train(e, rank, [s], False)
            ns.append(list(calls))
        out["equivalence"][case.name] = {"params": T._full_params(e), "ns": ns}
    muon_mod.newton_schulz = real_ns
    for name in FSDP2_RESUMES:
        out["fsdp2"][name] = _fsdp2_resume(rank, world, name, os.path.join(root, "conv", name))
    return out


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "shardopt", "ckpt", "--no-progress", *args], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("universal"))
    w2 = dist_utils.run(_job_w2, 2, root, timeout_s=900)
    for k, name in enumerate(SAVES):
        src, conv, uni = (os.path.join(root, d, name) for d in ("ds", "conv", "uni"))
        fmt = "deepspeed" if name == "ds-lion-z2" else "shardopt"
        if k == 0:  # the command line once, the functions for the rest
            _cli("convert", "--from", "deepspeed", src, conv)
            _cli("convert", "--to", "deepspeed-universal", conv, uni, "--state-format", fmt)
        else:
            ds_convert.from_deepspeed(src, conv)
            ds_convert.to_deepspeed_universal(conv, uni, state_format=fmt)
    w4 = dist_utils.run(_job_w4, 4, root, timeout_s=900)
    return root, w2, w4


def _rel(a, b):
    return T._rel(a, b)


# ---------------------------------------------------------------------------- the conversions
@pytest.mark.parametrize("name", list(SAVES))
def test_conversion_reads_every_stage_and_optimizer(runs, name):
    root, _, _ = runs
    info = offline.inspect(os.path.join(root, "conv", name))
    case = SAVES[name]
    assert info["world_size"] == 2 and info["layout"] == f"deepspeed-zero{case.stage}"
    expected = {"Lion": ["lion"], "AdamW": ["adamw"], "Muon": ["adamw", "muon"]}[case.type.split(".")[-1]]
    assert info["algorithms"] == expected
    assert {r["step"] for r in info["rows"] if r["kind"] == "param"} == {2.0}


def _rank_files(root, name):
    d = os.path.join(root, "ds", name, "t2")
    return [torch.load(os.path.join(d, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), weights_only=False)
            ["optimizer_state_dict"] for r in range(2)]


def _universal(root, name, fqn, key):
    (f,) = glob.glob(os.path.join(root, "uni", name, "*", "zero", fqn, f"{key}.pt"))
    return torch.load(f, weights_only=False)["param"]


def test_deepspeed_muon_momentum_round_trips(runs):
    """DeepSpeed's own Muon -> shardopt -> universal: the momentum of every matrix survives, read independently.

    At ZeRO-2 DeepSpeed keeps, per rank, the whole momentum of each matrix its partition touches, in group
    order; at ZeRO-3 the momentum is cut like the fp32 partition, every matrix into two halves.
    """
    root, _, _ = runs
    shapes = T.make_model().state_dict()
    muon_names = ["fc1.weight", "fc2.weight", "fc3.weight", "fc4.weight", "head.weight"]
    z2 = _rank_files(root, "ds-muon-z2")
    bufs = [sd["base_optimizer_state"]["state"][0]["momentum_buffer"] for sd in z2]
    held = [list(sd["param_slice_mappings"][0]) for sd in z2]
    z3 = _rank_files(root, "ds-muon-z3")
    halves = [sd["optimizer_state_dict"]["state"][0]["momentum_buffer"] for sd in z3]
    off3 = 0
    for n in muon_names:
        numel = shapes[n].numel()
        r = next(r for r in range(2) if n in held[r])
        off = sum(shapes[m].numel() for m in held[r][:held[r].index(n)])
        want2 = bufs[r][off:off + numel].view(shapes[n].shape)
        part = -(-numel // 2)
        want3 = torch.cat([h[off3:off3 + part] for h in halves])[:numel].view(shapes[n].shape)
        off3 += part
        for name, want in (("ds-muon-z2", want2), ("ds-muon-z3", want3)):
            assert want.abs().sum() > 0
            got = offline.read_full(os.path.join(root, "conv", name), f"optim.{n}.momentum_buffer").view(want.shape)
            assert torch.equal(got, want), f"{name}: {n}'s momentum changed in the conversion"
            assert torch.equal(_universal(root, name, n, "momentum_buffer"), want), f"{name}: {n} in the universal"


@pytest.mark.parametrize("name", list(SAVES))
def test_universal_checkpoint_carries_what_the_conversion_read(runs, name):
    root, _, _ = runs
    conv = os.path.join(root, "conv", name)
    info = offline.inspect(conv)
    for row in info["rows"]:
        if row["kind"] != "param":
            continue
        fqn = row["name"]
        for k in row["state"]:
            if k == "master_param":
                continue
            ukey = "exp_avg" if name == "ds-lion-z2" and k == "momentum_buffer" else k
            got = _universal(root, name, fqn, ukey)
            assert torch.equal(got.reshape(-1), offline.read_full(conv, f"optim.{fqn}.{k}").reshape(-1)), (fqn, k)
        w = offline.read_full(conv, f"model.{fqn}")
        assert torch.equal(_universal(root, name, fqn, "fp32"), w.float())


# ---------------------------------------------------------------------------- resuming at W=4
@pytest.mark.parametrize("name", list(OURS) + ["ds-lion-z2"])
def test_deepspeed_w2_checkpoint_resumes_at_w4_in_deepspeed(runs, name):
    _, w2, w4 = runs
    ref = w2[0][name]
    for rank in range(4):
        got = w4[rank]["resumed"][name]
        err = _rel(got, ref)
        # four quarter-batch gradients sum in another order than two halves: fp32 rounding only
        assert err <= 1e-6, f"{name}: resumed at W=4 differs from the uninterrupted W=2 run by {err:.3e}"
    if name == "muon-z3":
        dropped = _rel(w4[0]["resumed"]["muon-z3-weights-only"], ref)
        assert dropped > 1e-4, "resuming without the optimizer state gave the same result: the test cannot tell"


def test_deepspeed_muon_checkpoint_carries_on_in_shardopt_muon(runs):
    """DeepSpeed's own Muon at W=2 (ZeRO-2) -> shardopt.Muon in DeepSpeed ZeRO-3 at W=4, against the same
    checkpoint loaded into a single-process shardopt.Muon."""
    import shardopt.checkpoint as C

    root, _, w4 = runs
    model = T.make_model(seed=1)
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in OURS_FROM_DS_MUON.params.items()}
    aux, rest = T._split_aux(params)
    rest["ns_dtype"] = torch.float32
    opt = shardopt.Muon(shardopt.muon_param_groups(model, **aux), sharding="none", **rest)
    C.load(os.path.join(root, "conv", "ds-muon-z2"), model, opt)
    for s in range(2, T.STEPS):
        x, y = T.batch(s)
        grads = []
        for r in range(4):
            model.zero_grad()
            m = T.micro(4)
            torch.nn.functional.mse_loss(model(x[r * m:(r + 1) * m]), y[r * m:(r + 1) * m]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *gs in zip(model.parameters(), *grads):
            p.grad = sum(gs) / 4
        opt.step()
    ref = {n: p.detach() for n, p in model.named_parameters()}
    err = _rel(w4[0]["resumed"]["ds-muon-z2"], ref)
    assert err <= 2e-3, f"shardopt.Muon from DeepSpeed Muon's checkpoint: {err:.3e} from the single process"


@pytest.mark.parametrize("name", FSDP2_RESUMES)
def test_deepspeed_w2_checkpoint_resumes_at_w4_in_fsdp2(runs, name):
    _, w2, w4 = runs
    for rank in range(4):
        got, layout = w4[rank]["fsdp2"][name]
        assert layout == "fsdp2"
        err = _rel(got, w2[0][name.removesuffix("-live")])
        tol = 2e-3 if name.startswith("muon") else 1e-6
        assert err <= tol, f"{name}: FSDP2 at W=4 from the DeepSpeed W=2 checkpoint differs by {err:.3e}"


# ---------------------------------------------------------------------------- Muon at W=4
@pytest.mark.parametrize("case", W4_EQUIVALENCE, ids=lambda c: c.name)
def test_muon_w4_matches_single_process_and_orthogonalizes_each_matrix_once(runs, case):
    _, _, w4 = runs
    _, ref = T.reference_params(case)
    for rank in range(4):
        err = _rel(w4[rank]["equivalence"][case.name]["params"], ref)
        assert err <= 2e-3, f"{case.name} at W=4: {err:.3e} from the single-process Muon"
    T.assert_each_matrix_once([w4[r]["equivalence"][case.name]["ns"] for r in range(4)], 4)
