"""shardopt.checkpoint: resume at another world size and layout, DeepSpeed round trip, integrity, atomic
writes, and the ``shardopt ckpt`` tools.

Every resumed run is compared with an independent reference: the
single-process optimizer run uninterrupted for the same 2K steps (sharded
layouts match it by contract: Lion bitwise, AdamW 1e-6, Muon 2e-3), or for
DeepSpeed the uninterrupted DeepSpeed run. Gradients are the same global-batch
gradient on every rank (``cases.make_grads``), fresh random per step.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import dist_utils
import pytest
import torch
from cases import (
    assert_close_params,
    build,
    make_grads,
    make_params,
    max_rel_err,
    run_single,
)

import shardopt
import shardopt.checkpoint as C
from shardopt.checkpoint import cli, ds_convert, offline

K = 3  # steps before the save, and again after it
ALGOS = ["lion", "adamw", "muon"]
LAYOUTS = ["zero1", "fsdp2"]
HERE = os.path.dirname(os.path.abspath(__file__))


class Holder(torch.nn.Module):
    def __init__(self, dtype=torch.float32, shapes=None):
        super().__init__()
        self.ps = torch.nn.ParameterList(make_params(dtype) if shapes is None else make_params(dtype, shapes=shapes))
        self.register_buffer("counter", torch.arange(4.0))


def _model(layout, world, dtype=torch.float32):
    m = Holder(dtype)
    if layout in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,)) if layout == "fsdp2" else \
            init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(m, mesh=mesh)
    return m, list(m.parameters())


def _train(opt, ps, k0, k1, dtype=torch.float32):
    from torch.distributed.tensor import DTensor, distribute_tensor

    for k in range(k0, k1):
        for p, g in zip(ps, make_grads(k, dtype=dtype)):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        opt.step()


def _full(ps):
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in ps]


def _opt(name, ps, layout, **kw):
    opt = build(name, ps, backend="torch", **kw)
    want = {"hsdp": "fsdp2", "single": "none"}.get(layout, layout)
    assert opt.layout.name == want, (opt.layout.name, layout)
    return opt


# ---------------------------------------------------------------- resume at other world sizes and layouts
def _job_w4(rank, world, d):
    """Train and save at W=4 in every layout; resume the W=1 checkpoints here (1 -> 4)."""
    out = {}
    for name in ALGOS:
        for layout in LAYOUTS + (["hsdp"] if name != "adamw" else []):
            m, ps = _model(layout, world)
            opt = _opt(name, ps, layout)
            _train(opt, ps, 0, K)
            C.save(f"{d}/w4-{name}-{layout}", m, opt, extra={"step": K})
        for layout in LAYOUTS:
            m, ps = _model(layout, world)
            opt = _opt(name, ps, layout)
            extra = C.load(f"{d}/w1-{name}", m, opt)
            assert extra == {"step": K}
            _train(opt, ps, K, 2 * K)
            out[("1->4", name, layout)] = _full(ps)
    return out if rank == 0 else None


def _job_w2(rank, world, d):
    """4 -> 2 in each layout, ZeRO-1 -> FSDP2, HSDP -> FSDP2; save at W=2 for 2 -> 1; corruption on 2 ranks."""
    out = {}
    for name in ALGOS:
        for src, layout in [("zero1", "zero1"), ("fsdp2", "fsdp2"), ("zero1", "fsdp2"), ("hsdp", "fsdp2")]:
            if src == "hsdp" and name == "adamw":
                continue
            m, ps = _model(layout, world)
            opt = _opt(name, ps, layout)
            C.load(f"{d}/w4-{name}-{src}", m, opt)
            assert {float(st["step"]) for st in opt.state.values()} == {float(K)}
            _train(opt, ps, K, 2 * K)
            out[("4->2", name, f"{src}->{layout}")] = _full(ps)
        for layout in LAYOUTS:
            m, ps = _model(layout, world)
            opt = _opt(name, ps, layout)
            _train(opt, ps, 0, K)
            C.save(f"{d}/w2-{name}-{layout}", m, opt)
    # bf16 parameters: the fp32 master copy is sharded state too
    m, ps = _model("zero1", world, torch.bfloat16)
    opt = _opt("lion", ps, "zero1")
    _train(opt, ps, 0, K, torch.bfloat16)
    C.save(f"{d}/w2-lion-bf16", m, opt)
    # a checkpoint corrupted in a chunk only some ranks read: every rank raises, nobody hangs
    m, ps = _model("zero1", world)
    opt = _opt("lion", ps, "zero1")
    before = [st["momentum_buffer"].clone() for st in opt.state.values()]
    try:
        C.load(f"{d}/corrupt", m, opt)
        out["corrupt"] = None
    except C.CorruptCheckpointError as e:
        out["corrupt"] = str(e)
    out["untouched"] = all(torch.equal(a, st["momentum_buffer"]) for a, st in zip(before, opt.state.values()))
    return out


def _flip(path, pos):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def _chunk(ckpt, key_prefix, rank_file=None):
    """(file, offset, length) of a stored chunk of a key starting with ``key_prefix``."""
    with open(os.path.join(ckpt, "shardopt.json")) as f:
        sums = json.load(f)["checksums"]
    for cid, c in sorted(sums.items()):
        if cid.startswith(key_prefix) and (rank_file is None or c["file"].startswith(rank_file)):
            return os.path.join(ckpt, c["file"]), c["offset"], c["length"], cid
    raise KeyError(key_prefix)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("resume"))
    out = {}
    for name in ALGOS:  # W=1: save after K steps
        m, ps = _model("single", 1)
        opt = _opt(name, ps, "single")
        _train(opt, ps, 0, K)
        C.save(f"{d}/w1-{name}", m, opt, extra={"step": K})
    out.update(dist_utils.run(_job_w4, 4, d, timeout_s=180)[0])
    # corrupt the last optimizer-state chunk that W=4 rank 3 wrote (a tail range at W=2)
    shutil.copytree(f"{d}/w4-lion-zero1", f"{d}/corrupt")
    path, off, length, _ = _chunk(f"{d}/corrupt", "optim.ps.7.", "__3_")
    _flip(path, off + length // 2)
    r2 = dist_utils.run(_job_w2, 2, d, timeout_s=180)
    out.update({k: v for k, v in r2[0].items() if isinstance(k, tuple)})
    out["corrupt"] = [r["corrupt"] for r in r2]
    out["untouched"] = [r["untouched"] for r in r2]
    for name in ALGOS:  # 2 -> 1
        for layout in LAYOUTS:
            m, ps = _model("single", 1)
            opt = _opt(name, ps, "single")
            C.load(f"{d}/w2-{name}-{layout}", m, opt)
            _train(opt, ps, K, 2 * K)
            out[("2->1", name, layout)] = _full(ps)
    m, ps = _model("single", 1, torch.bfloat16)
    opt = _opt("lion", ps, "single")
    C.load(f"{d}/w2-lion-bf16", m, opt)
    _train(opt, ps, K, 2 * K, torch.bfloat16)
    out["bf16"] = (_full(ps), [opt.state[p]["master_param"].clone() for p in ps])
    return d, out


@pytest.mark.slow
@pytest.mark.parametrize("name", ALGOS)
def test_resume_at_other_world_sizes_and_layouts(resumed, name):
    _, out = resumed
    ref, _ = run_single(name, 2 * K)
    cases = [k for k in out if isinstance(k, tuple) and k[1] == name]
    # 1->4 and 2->1 in both layouts, 4->2 in both, ZeRO-1 -> FSDP2, and HSDP -> FSDP2 (Lion, Muon)
    assert len(cases) == 2 + 2 + 3 + (1 if name != "adamw" else 0), cases
    for key in cases:
        try:
            assert_close_params(out[key], ref, name)
        except AssertionError as e:
            raise AssertionError(f"{key}: {e}") from None


@pytest.mark.slow
def test_resume_bf16_master_weights_zero1_to_single(resumed):
    _, out = resumed
    params, masters = out["bf16"]
    ref, ref_opt = run_single("lion", 2 * K, dtype=torch.bfloat16)
    assert_close_params(params, ref, "lion")
    ref_masters = [ref_opt.state[p]["master_param"] for p in make_order(ref_opt)]
    assert all(torch.equal(a, b) for a, b in zip(masters, ref_masters))


def make_order(opt):
    """Parameters in model order (the groups of cases.two_groups interleave them)."""
    ps = [p for g in opt.param_groups for p in g["params"]]
    n = len(ps)
    half = (n + 1) // 2
    out = [None] * n
    out[::2] = ps[:half]
    out[1::2] = ps[half:]
    return out


@pytest.mark.slow
def test_corrupt_chunk_raises_on_every_rank(resumed):
    _, out = resumed
    msgs = out["corrupt"]
    assert all(m is not None for m in msgs), msgs
    for m in msgs:
        assert "corrupt" in m and "__3_" in m and "ps.7" in m and "CRC-32" in m, m
    assert all(out["untouched"])


# ---------------------------------------------------------------- integrity
def _single_ckpt(path, name="lion", steps=K, **kw):
    m, ps = _model("single", 1)
    opt = _opt(name, ps, "single", **kw)
    _train(opt, ps, 0, steps)
    C.save(path, m, opt, extra={"step": steps})
    return m, opt


def _fresh(name="lion", shapes=None, dtype=torch.float32):
    m = Holder(dtype, shapes)
    return m, _opt(name, list(m.parameters()), "single")


@pytest.fixture()
def base_ckpt(tmp_path):
    path = str(tmp_path / "base")
    _single_ckpt(path)
    return path


def _copy(base, tmp_path, tag):
    dst = str(tmp_path / tag)
    shutil.copytree(base, dst)
    return dst


def _manifest(path):
    from shardopt.checkpoint._manifest import read_manifest

    return read_manifest(path)


def test_truncated_file(base_ckpt, tmp_path):
    ck = _copy(base_ckpt, tmp_path, "trunc")
    data = os.path.join(ck, "__0_0.distcp")
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    # the chunks past the cut are named
    past = [c for c in _manifest(ck)["checksums"].values() if c["offset"] + c["length"] > size // 2]
    m, opt = _fresh()
    with pytest.raises(C.CorruptCheckpointError) as e:
        C.load(ck, m, opt)
    msg = str(e.value)
    assert "__0_0.distcp" in msg and "truncated" in msg and "parameter 'ps." in msg, msg
    assert past
    n, errors = offline.verify(ck)
    assert len(errors) == len(past) and all("truncated" in x for x in errors)


def test_flipped_byte(base_ckpt, tmp_path):
    ck = _copy(base_ckpt, tmp_path, "flip")
    path, off, length, cid = _chunk(ck, "optim.ps.2.momentum_buffer")
    _flip(path, off + length // 2)
    m, opt = _fresh()
    with pytest.raises(C.CorruptCheckpointError) as e:
        C.load(ck, m, opt)
    msg = str(e.value)
    assert "__0_0.distcp" in msg and "parameter 'ps.2'" in msg and "momentum_buffer" in msg and "CRC-32" in msg, msg
    assert offline.verify(base_ckpt)[1] == []
    assert len(offline.verify(ck)[1]) == 1


def test_missing_parameter_entry(base_ckpt, tmp_path):
    from shardopt.checkpoint._manifest import write_manifest

    ck = _copy(base_ckpt, tmp_path, "missing")
    doc = _manifest(ck)
    del doc["params"]["ps.3"]
    doc["tensors"] = {k: v for k, v in doc["tensors"].items() if v["fqn"] != "ps.3" or v["slot"] == "model"}
    write_manifest(ck, doc)  # a consistent manifest that simply lacks the parameter
    m, opt = _fresh()
    with pytest.raises(C.MissingEntryError) as e:
        C.load(ck, m, opt)
    assert "'ps.3'" in str(e.value) and "shardopt.json" in str(e.value)
    # editing the manifest without its checksum is corruption, named as such
    ck2 = _copy(base_ckpt, tmp_path, "edited")
    with open(os.path.join(ck2, "shardopt.json")) as f:
        doc = json.load(f)
    del doc["params"]["ps.3"]
    with open(os.path.join(ck2, "shardopt.json"), "w") as f:
        json.dump(doc, f)
    with pytest.raises(C.CorruptCheckpointError, match="shardopt.json"):
        C.load(ck2, m, opt)


def test_shape_and_dtype_mismatch(base_ckpt):
    from cases import SHAPES

    shapes = list(SHAPES)
    shapes[4] = (8, 16)
    m, opt = _fresh(shapes=shapes)
    with pytest.raises(C.ShapeMismatchError) as e:
        C.load(base_ckpt, m, opt)
    assert "'ps.4'" in str(e.value) and "(16, 8)" in str(e.value) and "(8, 16)" in str(e.value) and base_ckpt in str(e.value)
    m, opt = _fresh(dtype=torch.bfloat16)
    with pytest.raises(C.ShapeMismatchError, match="float32 in the checkpoint but bfloat16"):
        C.load(base_ckpt, m, opt)


def test_other_algorithm_refused(tmp_path):
    path = str(tmp_path / "adamw")
    _single_ckpt(path, "adamw")
    m, opt = _fresh("lion")
    with pytest.raises(C.AlgorithmMismatchError) as e:
        C.load(path, m, opt)
    msg = str(e.value)
    assert "adamw" in msg and "lion" in msg and "exp_avg" in msg and "momentum_buffer" in msg, msg


def test_unreadable_metadata_and_strictness(base_ckpt, tmp_path):
    ck = _copy(base_ckpt, tmp_path, "meta")
    with open(os.path.join(ck, ".metadata"), "r+b") as f:
        f.truncate(10)
    m, opt = _fresh()
    with pytest.raises(C.CorruptCheckpointError, match=r"\.metadata"):
        C.load(ck, m, opt)
    # a model with a parameter the checkpoint lacks
    m2 = Holder()
    m2.extra = torch.nn.Linear(2, 2)
    with pytest.raises(C.MissingEntryError, match="extra.weight"):
        C.load(base_ckpt, m2, None)


# ---------------------------------------------------------------- extra state, scheduler, atomic writes
def test_extra_scheduler_and_rng(tmp_path):
    def make():
        m = Holder()
        opt = _opt("lion", list(m.parameters()), "single")
        return m, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def train(m, opt, sched, k0, k1):
        for k in range(k0, k1):
            for p, g in zip(m.parameters(), make_grads(k)):
                p.grad = g
            opt.step()
            sched.step()

    m, opt, sched = make()
    train(m, opt, sched, 0, K)
    torch.manual_seed(1234)
    C.save(str(tmp_path / "c"), m, opt, extra={"step": K, "sched": sched.state_dict(), "rng": C.rng_state()})
    want_rand = torch.rand(3)
    train(m, opt, sched, K, 2 * K)
    ref = _full(list(m.parameters()))

    m2, opt2, sched2 = make()
    extra = C.load(str(tmp_path / "c"), m2, opt2)
    sched2.load_state_dict(extra["sched"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] * 2 ** K  # the lr the scheduler had reached
    C.set_rng_state(extra["rng"])
    assert torch.equal(torch.rand(3), want_rand)
    train(m2, opt2, sched2, K, 2 * K)
    assert_close_params(_full(list(m2.parameters())), ref, "lion")


def test_optimizer_only_checkpoint_leaves_the_model_alone(tmp_path, capsys):
    """model_weights=False (the Trainer integration's mode): the model names the parameters, nothing of it is stored."""
    path = str(tmp_path / "opt_only")
    m, opt = _fresh("adamw")
    _train(opt, list(m.parameters()), 0, K)
    C.save(path, m, opt, model_weights=False)
    man = _manifest(path)
    assert man["model"] == {} and not any(k.startswith("model.") for k in man["tensors"])
    assert set(man["params"]) == {n for n, _ in m.named_parameters()}
    m2, opt2 = _fresh("adamw")
    before = _full(list(m2.parameters()))
    C.load(path, m2, opt2, model_weights=False)
    assert all(torch.equal(a, b) for a, b in zip(_full(list(m2.parameters())), before))  # weights untouched
    for p, q in zip(m.parameters(), m2.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], opt2.state[q][k])
        assert opt2.state[q]["step"] == K
    with pytest.raises(C.MissingEntryError, match="model weight"):  # the weights were not saved
        C.load(path, m2, opt2)
    assert _run_cli("inspect", path) == 0 and "exp_avg" in capsys.readouterr().out
    assert _run_cli("consolidate", path, str(tmp_path / "c.pt")) == 0
    sd = torch.load(str(tmp_path / "c.pt"), weights_only=False)
    assert sd["model"] == {} and len(sd["state"]) == len(list(m.parameters()))


def _kill_child(path, flag):
    return f"""
import sys, time
sys.path.insert(0, {HERE!r})
import torch
import test_checkpoint as T
import shardopt.checkpoint as C
from shardopt.checkpoint import _storage as S
m, opt = T._fresh()
C.load({path!r}, m, opt)
T._train(opt, list(m.parameters()), T.K, T.K + 2)
orig, n = S.SavePlanner.resolve_data, [0]
def slow(self, item):
    n[0] += 1
    if n[0] == 4:  # part of the tensors are in the file: stop here until killed
        open({flag!r}, "w").close()
        time.sleep(120)
    return orig(self, item)
S.SavePlanner.resolve_data = slow
C.save({path!r}, m, opt)
"""


@pytest.mark.slow
def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path):
    path, flag = str(tmp_path / "ck"), str(tmp_path / "flag")
    m, opt = _single_ckpt(path)
    offline.consolidate(path, str(tmp_path / "want.pt"))
    want_sd = torch.load(str(tmp_path / "want.pt"), weights_only=False)
    proc = subprocess.Popen([sys.executable, "-c", _kill_child(path, flag)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    t0 = time.time()
    while not os.path.exists(flag):
        if proc.poll() is not None or time.time() - t0 > 120:
            out = proc.stdout.read().decode() if proc.stdout else ""
            proc.kill()
            pytest.fail(f"the saving child never reached the kill point:\n{out}")
        time.sleep(0.05)
    assert os.path.isdir(path + ".tmp") and os.listdir(path + ".tmp")  # it was mid-write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert offline.verify(path)[1] == []
    m2, opt2 = _fresh()
    assert C.load(path, m2, opt2) == {"step": K}
    for i, p in enumerate(m2.parameters()):
        assert torch.equal(p.detach(), want_sd["model"][f"ps.{i}"])
        want_m = want_sd["state"][_state_index(want_sd, f"ps.{i}")]["momentum_buffer"]
        assert torch.equal(opt2.state[p]["momentum_buffer"], want_m)
    # the next save cleans up and succeeds
    _train(opt2, list(m2.parameters()), K, K + 1)
    C.save(path, m2, opt2)
    assert not os.path.exists(path + ".tmp") and offline.verify(path)[1] == []


def _state_index(sd, fqn):
    for g in sd["param_groups"]:
        for i, n in zip(g["params"], g["param_names"]):
            if n == fqn:
                return i
    raise KeyError(fqn)


def test_crash_between_renames(tmp_path, monkeypatch):
    from shardopt.checkpoint import _storage as S

    path = str(tmp_path / "ck")
    m, opt = _single_ckpt(path)
    want = [p.detach().clone() for p in m.parameters()]
    _train(opt, list(m.parameters()), K, K + 1)
    real = os.rename

    def crash(a, b):
        if os.fspath(a) == path + ".tmp":  # path -> path.old is done; path.tmp -> path never happens
            raise KeyboardInterrupt("power cut")
        return real(a, b)

    monkeypatch.setattr(S.os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        C.save(path, m, opt)
    monkeypatch.setattr(S.os, "rename", real)
    assert not os.path.exists(path) and os.path.isdir(path + ".old")
    m2, opt2 = _fresh()
    with pytest.warns(RuntimeWarning, match="interrupted"):
        C.load(path, m2, opt2)
    assert all(torch.equal(a, b.detach()) for a, b in zip(want, m2.parameters()))
    C.save(path, m, opt)  # recovers the swap, then replaces it
    assert os.path.isdir(path) and not os.path.exists(path + ".old")
    m3, opt3 = _fresh()
    C.load(path, m3, opt3)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(m.parameters(), m3.parameters()))


# ---------------------------------------------------------------- saves that fail
class _FullDisk:
    """A file stream that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, stream, room):
        self.stream, self.room = stream, room

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _job_disk_full(rank, world, d):
    """Save, train a step, then save again with rank 1's disk filling up mid-write."""
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    m, ps = _model("zero1", world)
    opt = _opt("adamw", ps, "zero1")
    _train(opt, ps, 0, K)
    path = f"{d}/ck"
    C.save(path, m, opt, extra={"step": K})
    saved = _full(ps)
    _train(opt, ps, K, K + 1)
    real = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, p, mode):
        with real(self, p, mode) as stream:
            full = rank == 1 and "w" in mode and str(p).endswith(".distcp")
            yield _FullDisk(stream, 64) if full else stream

    FileSystem.create_stream = create_stream
    try:
        C.save(path, m, opt, extra={"step": K + 1})
        err = None
    except Exception as e:  # noqa: BLE001 - the point: a training loop's `except Exception` catches it
        err = (type(e).__name__, isinstance(e, C.CheckpointError), str(e))
    finally:
        FileSystem.create_stream = real
    # the previous checkpoint is whole and loads, into a fresh model and optimizer
    m2, ps2 = _model("zero1", world)
    opt2 = _opt("adamw", ps2, "zero1")
    extra = C.load(path, m2, opt2)
    return {"err": err, "extra": extra, "same": all(torch.equal(a, b) for a, b in zip(saved, _full(ps2))),
            "listing": sorted(os.listdir(d))}


@pytest.mark.slow
def test_disk_full_during_save_is_a_checkpoint_error_on_every_rank(tmp_path):
    d = str(tmp_path)
    res = dist_utils.run(_job_disk_full, 2, d, timeout_s=120)
    for r in res:
        assert r["err"] is not None, "the save on a full disk did not fail"
        name, is_ckpt_error, msg = r["err"]
        assert is_ckpt_error, r["err"]
        assert f"{d}/ck" in msg and "free on" in msg and "full disk" in msg and "rank(s) 1" in msg, msg
        assert r["extra"] == {"step": K} and r["same"], r
    assert res[0]["listing"] == ["ck"]  # the partial write is gone, the previous checkpoint stays
    assert offline.verify(f"{d}/ck")[1] == []


def test_save_onto_a_regular_file_is_refused_before_touching_it(tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a checkpoint")
    m, opt = _fresh()
    with pytest.raises(C.CheckpointError, match=r"afile is an existing file, not a directory"):
        C.save(str(afile), m, opt)
    assert afile.read_bytes() == b"not a checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # no afile.old, no afile.tmp
    # the offline writer (split) refuses it the same way
    offline_pt = tmp_path / "c.pt"
    _single_ckpt(str(tmp_path / "ck"))
    offline.consolidate(str(tmp_path / "ck"), str(offline_pt))
    with pytest.raises(C.CheckpointError, match="existing file"):
        offline.split(str(offline_pt), str(afile))
    assert afile.read_bytes() == b"not a checkpoint"


def test_missing_manifest_messages_say_what_the_folder_is(tmp_path):
    """The 'interrupted save' diagnosis only where the files show one."""
    from shardopt.checkpoint._manifest import read_manifest

    folder = tmp_path / "runs"
    for name in ("lion", "adamw"):
        _single_ckpt(str(folder / name), name)
    (folder / "notes.txt").write_text("x")
    dcp_only = tmp_path / "dcp_only"
    shutil.copytree(folder / "lion", dcp_only)
    os.remove(dcp_only / "shardopt.json")
    tmp = tmp_path / "ck.tmp"
    tmp.mkdir()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "shardopt.json.part").write_text("{")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        folder: ["folder of 2 shardopt checkpoint(s) (adamw, lion)", str(folder / "adamw")],
        dcp_only: ["torch.distributed.checkpoint files but no shardopt.json"],
        tmp: ["interrupted save", str(tmp_path / "ck")],
        partial: ["interrupted save"],
        empty: ["is not a shardopt checkpoint: it has no shardopt.json"],
    }
    for path, needles in cases.items():
        with pytest.raises(C.CheckpointError) as e:
            read_manifest(str(path))
        msg = str(e.value)
        assert all(n in msg for n in needles), (path, msg)
        assert ("interrupted" in msg) == (path in (tmp, partial)), msg
    with pytest.raises(C.CheckpointError, match="save that never completed"):
        C.load(str(tmp_path / "ck"), *_fresh())


# ---------------------------------------------------------------- the CLI
def _run_cli(*argv):
    return cli.main(["--no-progress", *argv])


@pytest.mark.slow
def test_cli_inspect_a_w4_zero1_checkpoint(resumed, capsys):
    d, _ = resumed
    assert _run_cli("inspect", f"{d}/w4-muon-zero1") == 0
    out = capsys.readouterr().out
    assert "layout zero1, world size 4" in out and "Muon" in out
    assert "counter (buffer)" in out
    row = next(x for x in out.splitlines() if x.startswith("ps.2 "))
    # human units in the table (weights + state: 2 x 13 x 11 fp32 = 1144 bytes), exact bytes in --json
    assert row.split() == ["ps.2", "13x11", "float32", "muon", "momentum_buffer", "float32", "3", "1.1", "KiB"]
    row = next(x for x in out.splitlines() if x.startswith("ps.3 "))
    assert row.split() == ["ps.3", "1", "float32", "adamw", "exp_avg,exp_avg_sq", "float32", "3", "12", "B"]
    assert _run_cli("inspect", "--json", f"{d}/w4-muon-zero1") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["world_size"] == 4 and info["layout"] == "zero1" and info["algorithms"] == ["adamw", "muon"]
    assert {r["name"]: r["bytes"] for r in info["rows"]}["ps.2"] == 2 * 13 * 11 * 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_cli_consolidate_split_roundtrip(resumed, tmp_path, name):
    d, _ = resumed
    src = f"{d}/w4-{name}-zero1"
    a, b, back = str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), str(tmp_path / "back")
    assert _run_cli("consolidate", src, a) == 0
    assert _run_cli("split", a, back) == 0
    assert _run_cli("verify", back) == 0
    assert _run_cli("consolidate", back, b) == 0
    sa, sb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert sa["param_groups"] == sb["param_groups"] and sa["extra"] == sb["extra"] == {"step": K}
    assert sa["state"].keys() == sb["state"].keys() and sa["model"].keys() == sb["model"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k])
    # independent reference: the single-process optimizer's own state_dict after K steps
    _, ref_opt = run_single(name, K)
    ref = ref_opt.state_dict()
    for i, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(sa["state"][i][k], v) if name == "lion" else max_rel_err([sa["state"][i][k]], [v]) <= 1e-6
    # the consolidated file resumes a single-process optimizer (shardopt, and torch's for AdamW)
    ps = make_params()
    for p, v in zip(ps, [sa["model"][f"ps.{i}"] for i in range(len(ps))]):
        p.data.copy_(v)
    opt = build(name, ps, backend="torch", sharding="none") if name == "lion" else \
        torch.optim.AdamW([{"params": ps[::2]}, {"params": ps[1::2]}])
    opt.load_state_dict(sa)
    for k in range(K, 2 * K):
        for p, g in zip(ps, make_grads(k)):
            p.grad = g
        opt.step()
    want, _ = run_single(name, 2 * K)
    assert_close_params([p.detach() for p in ps], want, name)


@pytest.mark.slow
def test_cli_verify_and_entry_points(resumed, tmp_path, capsys):
    d, _ = resumed
    ck = str(tmp_path / "v")
    shutil.copytree(f"{d}/w4-adamw-fsdp2", ck)
    assert _run_cli("verify", ck) == 0
    assert "OK" in capsys.readouterr().out
    path, off, length, _ = _chunk(ck, "model.ps.4")
    _flip(path, off + length // 2)
    assert _run_cli("verify", ck) == 1
    err = capsys.readouterr().err
    assert "FAIL" in err and "parameter 'ps.4'" in err and os.path.basename(path) in err
    # python -m shardopt.checkpoint, and the top-level console script
    r = subprocess.run([sys.executable, "-m", "shardopt.checkpoint", "inspect", f"{d}/w2-lion-fsdp2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "layout fsdp2, world size 2" in r.stdout, r.stderr
    from shardopt import cli as top

    assert top.main(["ckpt", "--no-progress", "verify", f"{d}/w2-lion-fsdp2"]) == 0


def test_cli_on_a_folder_of_checkpoints(tmp_path, capsys):
    """A folder of checkpoints (as the demo writes): inspect and verify act on each, consolidate asks which."""
    folder = tmp_path / "checkpoint"
    _single_ckpt(str(folder / "muon"), "muon")
    _single_ckpt(str(folder / "lion"), "lion")
    (folder / "demo.json").write_text("{}")
    assert _run_cli("inspect", str(folder)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{folder} is a folder of 2 checkpoints: lion, muon")
    assert f"checkpoint  {folder / 'lion'}" in out and f"checkpoint  {folder / 'muon'}" in out
    # each group shows the settings of its own algorithm only
    assert sum(line.startswith("group ") for line in out.splitlines()) == 4  # lion x2; muon + its aux adamw
    aux = next(line for line in out.splitlines() if line.startswith("group ") and ", adamw:" in line)
    muon = next(line for line in out.splitlines() if line.startswith("group ") and ", muon:" in line)
    for key in ("ns_steps", "momentum", "nesterov", "ns_coefficients", "adjust_lr_fn"):
        assert f"{key}=" not in aux and f"{key}=" in muon, (key, aux, muon)
    assert "betas=" in aux and "eps=" in aux and "betas=" not in muon
    assert _run_cli("inspect", "--json", str(folder)) == 0
    info = json.loads(capsys.readouterr().out)
    assert [os.path.basename(c["path"]) for c in info["checkpoints"]] == ["lion", "muon"]
    raw_aux = next(g for g in info["checkpoints"][1]["groups"] if g["algorithm"] == "adamw")
    assert "ns_steps" in raw_aux  # --json keeps every stored setting

    assert _run_cli("verify", str(folder)) == 0
    out = capsys.readouterr().out
    assert f"{folder / 'lion'}: OK" in out and f"{folder / 'muon'}: OK" in out and "2 of 2 checkpoints OK" in out
    path, off, length, _ = _chunk(str(folder / "muon"), "optim.ps.0")
    _flip(path, off + length // 2)
    assert _run_cli("verify", str(folder)) == 1
    cap = capsys.readouterr()
    assert f"{folder / 'lion'}: OK" in cap.out and "FAIL" in cap.err and "1 of 2 checkpoints OK" in cap.err

    assert _run_cli("consolidate", str(folder), str(tmp_path / "x.pt")) == 1
    err = capsys.readouterr().err
    assert "folder of 2 checkpoints (lion, muon)" in err and f"consolidate {folder / 'lion'}" in err, err
    assert not (tmp_path / "x.pt").exists()


def test_offline_writer_streams_one_tensor_at_a_time(tmp_path):
    """split/convert produce each tensor when DCP writes it, and drop it before the next."""
    import weakref

    from shardopt.checkpoint import _storage as S

    path = str(tmp_path / "c")
    _single_ckpt(path, "adamw")
    offline.consolidate(path, str(tmp_path / "c.pt"))
    alive, peak = [], [0]
    orig = S.LazyTensor.__init__

    def tracking_init(self, shape, dtype, make):
        def wrapped(make=make):
            t = make().clone()
            alive.append(weakref.ref(t))
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            return t
        orig(self, shape, dtype, wrapped)

    S.LazyTensor.__init__ = tracking_init
    try:
        offline.split(str(tmp_path / "c.pt"), str(tmp_path / "back"))
    finally:
        S.LazyTensor.__init__ = orig
    assert len(alive) > 10 and peak[0] <= 2, peak


# ---------------------------------------------------------------- DeepSpeed
DS_CFG = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
          "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


class IntNet(torch.nn.Module):
    """Independent linear maps with a linear loss: integer gradients, so DeepSpeed's data-parallel
    average is exact at any world size and runs at W=1, 2 and 4 see bitwise the same gradients."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Linear(5, 7)
        self.b = torch.nn.Linear(6, 3)
        self.c = torch.nn.Linear(4, 9, bias=False)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g))

    def forward(self, xa, xb, xc):
        return self.a(xa), self.b(xb), self.c(xc)


def _ds_step(fwd, backward, step, k):
    g = torch.Generator().manual_seed(100 + k)
    ri = lambda *s: torch.randint(-2, 3, s, generator=g).float()
    xs, rs = (ri(4, 5), ri(4, 6), ri(4, 4)), (ri(4, 7), ri(4, 3), ri(4, 9))
    loss = sum((o * r).sum() for o, r in zip(fwd(*xs), rs))
    backward(loss)
    step()


def _ds_groups(model):
    """Two param groups: DeepSpeed flattens and partitions each on its own."""
    return [{"params": [model.a.weight, model.a.bias]},
            {"params": [model.b.weight, model.b.bias, model.c.weight], "lr": 5e-3}]


def _ds_engine(kind):
    import deepspeed

    model = IntNet()
    if kind == "lion":  # shardopt Lion as DeepSpeed's client optimizer, ZeRO-1
        opt = shardopt.Lion(model.parameters(), lr=1e-2, weight_decay=0.1, sharding="none", backend="torch")
        eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config={**DS_CFG, "zero_optimization": {"stage": 1}})
    elif kind == "lion-bf16":
        model = model.bfloat16()
        opt = shardopt.Lion(model.parameters(), lr=1e-2, weight_decay=0.1, sharding="none", backend="torch")
        cfg = {**DS_CFG, "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
        eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    elif kind == "lion-config":  # the same, named in the DeepSpeed config through `import shardopt.deepspeed`
        importlib.import_module("shardopt.deepspeed")  # registers "shardopt.Lion" with DeepSpeed
        cfg = {**DS_CFG, "zero_optimization": {"stage": 1},
               "optimizer": {"type": "shardopt.Lion", "params": {"lr": 1e-2, "weight_decay": 0.1, "backend": "torch"}}}
        eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:  # DeepSpeed's own AdamW, ZeRO-2
        cfg = {**DS_CFG, "zero_optimization": {"stage": 2},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}}}
        eng, *_ = deepspeed.initialize(model=model, model_parameters=_ds_groups(model), config=cfg)
    return model, eng


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _ds_job_w2(rank, world, d):
    out = {}
    model, eng = _ds_engine("lion")
    for k in range(K):
        _ds_step(eng, eng.backward, eng.step, k)
    eng.save_checkpoint(f"{d}/ds2", tag="t")
    C.save(f"{d}/so2", eng, None, extra={"step": K})  # shardopt's own save of the engine
    for k in range(K, 2 * K):
        _ds_step(eng, eng.backward, eng.step, k)
    out["lion"] = _weights(model)
    model, eng = _ds_engine("adamw")
    for k in range(K):
        _ds_step(eng, eng.backward, eng.step, k)
    eng.save_checkpoint(f"{d}/ds2adam", tag="t")
    for k in range(K, 2 * K):
        _ds_step(eng, eng.backward, eng.step, k)
    out["adamw"] = _weights(model)
    # bf16 weights: DeepSpeed's fp32 partitions are the master copy, saved as master_param
    model, eng = _ds_engine("lion-bf16")
    step = lambda k: _ds_step(lambda *xs: eng(*[x.bfloat16() for x in xs]), eng.backward, eng.step, k)
    for k in range(K):
        step(k)
    C.save(f"{d}/so2bf16", eng)
    for k in range(K, 2 * K):
        step(k)
    out["bf16"] = _weights(model)
    return out


def _ds_job_w4(rank, world, d):
    out = {}
    model, eng = _ds_engine("lion")
    path, _ = eng.load_checkpoint(f"{d}/ds4")
    assert path is not None
    for k in range(K, 2 * K):
        _ds_step(eng, eng.backward, eng.step, k)
    out["converted"] = _weights(model)
    model, eng = _ds_engine("lion-config")
    assert C.load(f"{d}/so2", eng) == {"step": K}
    for k in range(K, 2 * K):
        _ds_step(eng, eng.backward, eng.step, k)
    out["shardopt"] = _weights(model)
    return out


def _plain_resume(path, cls, groups=False, **kw):
    model = IntNet()
    opt = cls(_ds_groups(model) if groups else model.parameters(), backend="torch", **kw)
    C.load(path, model, opt)
    for k in range(K, 2 * K):
        opt.zero_grad()
        _ds_step(model, lambda loss: loss.backward(), opt.step, k)
    return _weights(model)


def _same_consolidated(a, b, tmp):
    offline.consolidate(a, f"{tmp}/a.pt")
    offline.consolidate(b, f"{tmp}/b.pt")
    sa, sb = torch.load(f"{tmp}/a.pt", weights_only=False), torch.load(f"{tmp}/b.pt", weights_only=False)
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for k in sa["state"][i])
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


@pytest.mark.slow
def test_deepspeed_round_trip(tmp_path):
    pytest.importorskip("deepspeed")
    d = str(tmp_path)
    ref = dist_utils.run(_ds_job_w2, 2, d, timeout_s=240)[0]
    # DeepSpeed (W=2, shardopt Lion inside) -> shardopt -> DeepSpeed at W=4
    assert _run_cli("convert", "--from", "deepspeed", f"{d}/ds2", f"{d}/conv") == 0
    info = offline.inspect(f"{d}/conv")
    assert info["world_size"] == 2 and info["layout"] == "deepspeed-zero1" and info["algorithms"] == ["lion"]
    assert _run_cli("convert", "--to", "deepspeed", f"{d}/conv", f"{d}/ds4", "--world-size", "4") == 0
    res = dist_utils.run(_ds_job_w4, 4, d, timeout_s=240)
    for r in res:
        for key in ("converted", "shardopt"):
            assert all(torch.equal(a, b) for a, b in zip(r[key], ref["lion"])), key
    # ... and at W=1 in plain shardopt, from the converted and from shardopt's own save
    for src in ("conv", "so2"):
        got = _plain_resume(f"{d}/{src}", shardopt.Lion, lr=1.0)  # lr, betas, wd come from the checkpoint
        assert all(torch.equal(a, b) for a, b in zip(got, ref["lion"])), src
    # bf16 under DeepSpeed -> bf16 single process: weights and the fp32 master copy carry over exactly
    model = IntNet().bfloat16()
    opt = shardopt.Lion(model.parameters(), lr=1.0, backend="torch")
    C.load(f"{d}/so2bf16", model, opt)
    assert "master_param" in offline.inspect(f"{d}/so2bf16")["rows"][0]["state"]
    for k in range(K, 2 * K):
        opt.zero_grad()
        _ds_step(lambda *xs: model(*[x.bfloat16() for x in xs]), lambda loss: loss.backward(), opt.step, k)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), ref["bf16"]))
    # DeepSpeed's own Lion names its momentum exp_avg and has no "algorithm" key: rewrite the rank files
    # that way, and the conversion must give the same checkpoint
    shutil.copytree(f"{d}/ds2", f"{d}/ds2lion")
    for r in range(2):
        f = f"{d}/ds2lion/t/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        sd = torch.load(f, weights_only=False)
        base = sd["optimizer_state_dict"]["base_optimizer_state"]
        base["state"] = {i: {("exp_avg" if k == "momentum_buffer" else k): v for k, v in st.items()}
                         for i, st in base["state"].items()}
        for g in base["param_groups"]:
            del g["algorithm"]
        torch.save(sd, f)
    ds_convert.from_deepspeed(f"{d}/ds2lion", f"{d}/conv_lion")
    _same_consolidated(f"{d}/conv", f"{d}/conv_lion", str(tmp_path))
    # DeepSpeed's own AdamW (ZeRO-2, two param groups) -> shardopt AdamW at W=1
    ds_convert.from_deepspeed(f"{d}/ds2adam", f"{d}/conv_adam")
    info = offline.inspect(f"{d}/conv_adam")
    assert info["algorithms"] == ["adamw"] and [g["lr"] for g in info["groups"]] == [1e-2, 5e-3]
    got = _plain_resume(f"{d}/conv_adam", shardopt.AdamW, groups=True, lr=1.0)
    assert max_rel_err(got, ref["adamw"]) <= 1e-6
    # two groups through DeepSpeed's layout at another world size (3) and back: nothing moves
    ds_convert.to_deepspeed(f"{d}/conv_adam", f"{d}/ds3adam", world_size=3, zero_stage=2, state_format="deepspeed")
    ds_convert.from_deepspeed(f"{d}/ds3adam", f"{d}/back_adam")
    _same_consolidated(f"{d}/conv_adam", f"{d}/back_adam", str(tmp_path))


def _job_save_after_eval_forward(rank, world, d):
    """FSDP2 leaves the root unsharded after a forward without backward; save must still work."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(m[0], mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    m = make()
    opt = shardopt.Lion(m.parameters(), lr=1e-2, backend="torch")
    m(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        m(torch.randn(4, 8))  # evaluation: the root stays unsharded
    C.save(f"{d}/eval", m, opt)
    m2 = make()
    opt2 = shardopt.Lion(m2.parameters(), lr=1e-2, backend="torch")
    C.load(f"{d}/eval", m2, opt2)
    same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(m.parameters(), m2.parameters()))
    mom = all(torch.equal(opt.state[a]["momentum_buffer"].full_tensor(), opt2.state[b]["momentum_buffer"].full_tensor())
              for a, b in zip(m.parameters(), m2.parameters()))
    return same and mom


def test_fsdp2_save_after_evaluation_forward(tmp_path):
    assert all(dist_utils.run(_job_save_after_eval_forward, 2, str(tmp_path)))


# ---------------------------------------------------------------- groups and format versions
def test_load_refuses_other_groups_unless_keep_param_groups(tmp_path):
    m = Holder()
    ps = list(m.parameters())
    opt = shardopt.AdamW(ps, lr=1e-2, backend="torch")
    _train(opt, ps, 0, K)
    C.save(str(tmp_path / "ck"), m, opt)
    m2 = Holder()
    ps2 = list(m2.parameters())
    two = shardopt.AdamW([{"params": ps2[:3]}, {"params": ps2[3:], "lr": 5e-3, "weight_decay": 0.0}], lr=2e-3,
                         backend="torch")
    with pytest.raises(C.CheckpointError, match="1 param group.*has 2.*keep_param_groups=True"):
        C.load(str(tmp_path / "ck"), m2, two)
    assert all(st["step"] == 0 for st in two.state.values())  # nothing was loaded
    C.load(str(tmp_path / "ck"), m2, two, keep_param_groups=True)
    assert [g["lr"] for g in two.param_groups] == [2e-3, 5e-3] and two.param_groups[1]["weight_decay"] == 0.0
    for p, q in zip(ps, ps2):
        assert torch.equal(opt.state[p]["exp_avg"], two.state[q]["exp_avg"]) and two.state[q]["step"] == K


def test_version1_muon_momentum_is_converted(tmp_path):
    """Checkpoints written before Muon kept torch's EMA stored the sum m = mu*m + g = EMA / (1 - mu)."""
    from shardopt.checkpoint._manifest import read_manifest, write_manifest

    m = Holder()
    ps = list(m.parameters())
    opt = _opt("muon", ps, "single")
    _train(opt, ps, 0, K)
    ema = {id(p): opt.state[p]["momentum_buffer"].clone() for p in ps if p.dim() == 2}
    for p in ps:
        if p.dim() == 2:
            opt.state[p]["momentum_buffer"].div_(1 - 0.95)  # what the old code held
    C.save(str(tmp_path / "old"), m, opt)
    doc = read_manifest(str(tmp_path / "old"))
    doc["version"] = 1
    write_manifest(str(tmp_path / "old"), doc)
    m2 = Holder()
    ps2 = list(m2.parameters())
    opt2 = _opt("muon", ps2, "single")
    C.load(str(tmp_path / "old"), m2, opt2)
    for p, q in zip(ps, ps2):
        if p.dim() == 2:
            torch.testing.assert_close(opt2.state[q]["momentum_buffer"], ema[id(p)], rtol=1e-6, atol=0)
    offline.consolidate(str(tmp_path / "old"), str(tmp_path / "c.pt"))
    sd = torch.load(str(tmp_path / "c.pt"), weights_only=False)
    by_name = dict(zip((f"ps.{k}" for k in range(len(ps))), ps))
    g0 = sd["param_groups"][0]
    for i, name in zip(g0["params"], g0["param_names"]):
        torch.testing.assert_close(sd["state"][i]["momentum_buffer"], ema[id(by_name[name])], rtol=1e-6, atol=0)
    # the consolidated file (now version 2) loads into a fresh optimizer with no second conversion
    opt3 = _opt("muon", list(Holder().parameters()), "single")
    opt3.load_state_dict(sd)
    for q, p in zip(opt3.param_groups[0]["params"], [p for p in ps if p.dim() == 2]):
        torch.testing.assert_close(opt3.state[q]["momentum_buffer"], ema[id(p)], rtol=1e-6, atol=0)
