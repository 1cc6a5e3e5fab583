"""`shardopt bench` runs end to end (tiny sizes) and its traffic accounting holds the ZeRO-1 contract."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
import torch


def _bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "shardopt", "bench", *args, "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_bench_cpu_table(tmp_path):
    from shardopt.kernels import cpu

    # hidden 256: the matrices take int8 state (rows of 256 and 1024), the norms and biases keep fp32 state
    data, stdout = _bench(tmp_path, "--device", "cpu", "--hidden", "256", "--layers", "1", "--vocab", "64",
                          "--iters", "1", "--no-deepspeed", "--muon-hidden", "16", "--muon-layers", "1")
    by = {r["name"]: r for r in data["rows"]}
    for must in ("torch.optim.AdamW fused", "clip_grad_norm_ + torch.optim.AdamW fused", "foreach Lion (lerp/sign)",
                 "shardopt.Lion (defaults)", "shardopt.Lion nonfinite=None", "shardopt.AdamW (defaults)",
                 "shardopt.AdamW grad_clip_norm=1.0", "torch.optim.Muon", "shardopt.Muon (defaults)",
                 "shardopt.Lion state_dtype=bf16", "shardopt.AdamW state_dtype=bf16",
                 "shardopt.Lion state_dtype=int8", "shardopt.AdamW state_dtype=int8"):
        assert must in by, must
    assert all(r["ms"] > 0 for r in data["rows"])
    # bytes per element: the defaults' gradient pass reads the gradients once more
    assert by["shardopt.Lion (defaults)"]["bytes_per_elem"] == by["shardopt.Lion nonfinite=None"]["bytes_per_elem"] + 4
    # bf16 state: 2 bytes instead of 4 per state buffer read and write (Lion one buffer, AdamW two)
    assert by["shardopt.Lion state_dtype=bf16"]["bytes_per_elem"] == by["shardopt.Lion (defaults)"]["bytes_per_elem"] - 4
    assert by["shardopt.AdamW state_dtype=bf16"]["bytes_per_elem"] == by["shardopt.AdamW (defaults)"]["bytes_per_elem"] - 8
    # int8 state, counted per parameter: one that takes it moves g 4 + check 4 + p 4+4 + per state buffer
    # 1+1 and its scales (4+4 per 256 elements); the others (norms, biases) move fp32 state (4+4 per buffer)
    from shardopt.kernels.state_precision import int8_eligible
    from shardopt.tools.bench import transformer_shapes

    shapes = transformer_shapes(256, 1, 64)
    n = sum(math.prod(s) for s in shapes)
    assert sum(math.prod(s) for s in shapes if int8_eligible(s)) > 0.99 * n
    for name, buffers in (("Lion", 1), ("AdamW", 2)):
        want = sum(math.prod(s) * (16 + buffers * (2 + 8 / 256 if int8_eligible(s) else 8)) for s in shapes) / n
        got = by[f"shardopt.{name} state_dtype=int8"]["bytes_per_elem"]
        assert abs(got - want) < 1e-9, (name, got, want)
    assert f"{by['shardopt.Lion state_dtype=int8']['bytes_per_elem']:.2f}" in stdout
    for r in data["rows"]:
        if r["algo"] != "muon":
            assert abs(r["GB/s"] - data["params"] * r["bytes_per_elem"] / r["ms"] / 1e6) < 1e-6 * r["GB/s"]
    assert data["roofline_GBps"] > 0
    roof = {r["label"]: r for r in data["roofline"]}
    assert data["roofline"][0]["GB/s"] == data["roofline_GBps"]
    if cpu.available():  # the C++ in-place stream kernel (12 bytes per element) and its read-only pass (4)
        assert list(roof) == ["roofline: in-place stream a += s*b (C++)", "roofline: read-only stream sum(a) (C++)"]
        assert [r["bytes_per_elem"] for r in data["roofline"]] == [12, 4]
        assert "stream triad" not in stdout
    else:  # torch's out= triad, labelled as such
        assert list(roof) == ["roofline: stream triad a = b + s*c (torch)"]
    assert all(f"{label:<44}" in stdout for label in roof)
    # the orthogonality error of each Muon row is measured, and it is small (a nearly orthogonal update)
    assert 0 < by["shardopt.Muon (defaults)"]["ortho_rms_err"] < 0.5
    assert 0 < by["torch.optim.Muon"]["ortho_rms_err"] < 0.5
    assert {t["target"] for t in data["targets"]} >= {"default Muon vs torch.optim.Muon",
                                                         "default AdamW vs torch fused AdamW",
                                                         "bf16-state Lion vs fp32-state Lion",
                                                         "int8-state Lion vs fp32-state Lion"}
    assert "vs best peer" in stdout and "targets" in stdout
    # each elementwise target says what the row would reach at the roofline with its bytes per element
    by_t = {t["target"]: t for t in data["targets"]}
    for label, ours, ref in (("default AdamW vs torch fused AdamW", "shardopt.AdamW (defaults)",
                              "torch.optim.AdamW fused"),
                             ("default Lion vs Lion nonfinite=None (the check costs <= 15%)",
                              "shardopt.Lion (defaults)", "shardopt.Lion nonfinite=None")):
        at_roof_ms = data["params"] * by[ours]["bytes_per_elem"] / (data["roofline_GBps"] * 1e9) * 1e3
        want = by[ref]["ms"] / at_roof_ms
        assert abs(by_t[label]["at_roofline"] - want) < 1e-9 * want, label
        assert f"at the roofline {by_t[label]['at_roofline']:.2f}x" in stdout
    assert "at_roofline" not in by_t["default Muon vs torch.optim.Muon"]  # NS is no stream


def test_bench_distributed_muon_traffic_equals_adamw_all_gather(tmp_path):
    rows, stdout = _bench(tmp_path, "--distributed", "--worlds", "2", "--hidden", "32", "--layers", "2",
                          "--vocab", "64", "--iters", "1", "--no-overlap")
    by = {(r["algo"], r["rank"]): r for r in rows}
    for rank in (0, 1):
        assert by[("muon", rank)]["traffic"]["all_gather"] == by[("adamw", rank)]["traffic"]["all_gather"] > 0
        assert set(by[("muon", rank)]["traffic"]) <= {"all_gather", "all_reduce"}
        assert by[("lion", rank)]["layout"] == "zero1"
    assert "(equal)" in stdout


def test_bench_deepspeed_muon_budget(tmp_path):
    """shardopt.Muon under DeepSpeed sends no more than DeepSpeed's own Muon and runs NS once per matrix."""
    import pytest

    pytest.importorskip("deepspeed")
    rows, stdout = _bench(tmp_path, "--distributed", "--deepspeed", "--worlds", "2", "--ds-hidden", "32",
                          "--ds-layers", "1")
    by = {(r["stage"], r["optimizer"]): r for r in rows}
    for stage in (1, 2, 3):
        ours, theirs = by[(stage, "shardopt.Muon")], by[(stage, "DeepSpeed Muon")]
        assert max(ours["bytes_per_rank"]) <= max(theirs["bytes_per_rank"]), (stage, ours, theirs)
        assert sum(ours["ns_per_rank"]) == ours["matrices"] == 4
        assert all(ours["ns_per_rank"])
        assert sum(theirs["ns_per_rank"]) >= theirs["matrices"]
    assert "ZeRO-3 W=2: shardopt.Muon" in stdout and "MORE THAN" not in stdout


def test_bench_newton_schulz_choices_time_and_orthogonality(tmp_path):
    rows, stdout = _bench(tmp_path, "--ns-only", "--muon-hidden", "24", "--muon-layers", "1", "--iters", "1")
    by = {r["name"]: r for r in rows}
    quintic = by["NS quintic (3.4445, -4.775, 2.0315) float32"]
    pe = by["NS polar_express float32"]
    assert "NS polar_express, ns_split=3 (q/k/v) bfloat16" in by and all(r["ms"] > 0 for r in rows)
    # the quintic stops in its band; Polar Express gets closer to orthogonal in the same 5 steps
    for kind in ("decaying", "gaussian"):
        assert pe[kind]["rms_err"] < quintic[kind]["rms_err"]
    assert "rms|1-s|" in stdout


def test_bench_distributed_overlap_rows(tmp_path):
    data, stdout = _bench(tmp_path, "--distributed", "--worlds", "2", "--hidden", "32", "--layers", "1",
                          "--vocab", "64", "--iters", "1", "--muon-hidden", "16", "--muon-layers", "1")
    modes = {(t["layout"], t["algo"], t["overlap"]) for t in data["overlap"]}
    assert modes == {("zero1", a, m) for a in ("adamw", "muon") for m in ("off", "on", "param_gather")} | {
        ("fsdp2", "muon", "off"), ("fsdp2", "muon", "on")}
    assert all(t["ms_max"] > 0 and t["wait_ms_max"] >= 0 for t in data["overlap"])
    assert {r["algo"] for r in data["zero1"]} == {"lion", "adamw", "muon"}
    assert "comm wait ms" in stdout


def test_target_lines_give_the_spread_of_per_round_ratios(capsys):
    # the reference row's rounds vary fivefold and ours tracks it at 1.25x: each round's ratio is 1.25, which
    # ratios of rounds sorted separately (or of the medians alone) would not show
    from shardopt.tools import bench

    torch.manual_seed(0)
    ref = (torch.rand(9) * 4 + 1).tolist()
    ours = [t / 1.25 for t in ref]
    rows = [{"name": "shardopt.AdamW (defaults)", "ms": statistics.median(ours), "round_ms": ours},
            {"name": "torch.optim.AdamW fused", "ms": statistics.median(ref), "round_ms": ref}]
    lo, hi = bench.round_ratio_spread(rows[0], rows[1])
    assert abs(lo - 1.25) < 1e-12 and abs(hi - 1.25) < 1e-12
    # a round-by-round ratio that moves: the middle half of 1..8 (inclusive quartiles) is 2.75..6.25
    ratios = [1, 2, 3, 4, 5, 6, 7, 8]
    ours2 = [r / k for r, k in zip(ref, ratios)]
    assert bench.round_ratio_spread({"round_ms": ours2}, {"round_ms": ref[:8]}) == pytest.approx((2.75, 6.25))
    assert bench.round_ratio_spread({"round_ms": ours[:3]}, {"round_ms": ref[:3]}) is None  # too few rounds
    out = bench._print_targets(rows)
    (rec,) = [t for t in out if t["target"] == "default AdamW vs torch fused AdamW"]
    assert rec["round_ratio_middle_half"] == pytest.approx([1.25, 1.25])
    assert "rounds 1.25-1.25x" in capsys.readouterr().out


_HELD_SCRIPT = r"""
import resource, torch
from shardopt.tools import bench
shapes = bench.transformer_shapes(256, 4, 4096)
n = sum(torch.Size(s).numel() for s in shapes)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
torch.randn(1)
base = peak()
bench._elementwise_rows(shapes, torch.device("cpu"), 1, False)
print(n, base, peak())
"""


def test_cuda_defaults_fit_an_80gb_gpu_by_the_measured_bytes_per_element():
    """bench holds every contender's parameters, gradients and state at once: the per-element estimate that
    sizes the CUDA defaults (and warns before a run that does not fit) covers what a CPU run of the same rows
    holds at its peak (the process's peak resident memory, 4.2 M elements), plus the four rows a CUDA run adds
    (the Triton and DeepSpeed Lion and AdamW: parameters and gradients 8 bytes each, state 4 or 8), and the
    defaults fit in 78 GiB by it."""
    from shardopt.tools import bench

    r = subprocess.run([sys.executable, "-c", _HELD_SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n, base, end = map(int, r.stdout.split())
    held = (end - base) / n
    assert 150 < held and held + 4 * 8 + 2 * (4 + 8) <= bench._HELD_PER_ELEM["elementwise"], held
    d = bench._DEFAULTS["cuda"]
    n_cuda = sum(torch.Size(s).numel() for s in bench.transformer_shapes(d["hidden"], d["layers"], d["vocab"]))
    n_muon = sum(torch.Size(s).numel() for s in bench.muon_shapes(d["muon_hidden"], d["muon_layers"]))
    assert bench.cuda_bytes_needed(n_cuda, n_muon) < 78 * 2**30


def test_gpu_check_script_refuses_a_machine_without_cuda(tmp_path):
    """tests/gpu_check.sh (the GPU tests and the CUDA bench in one command) says why it stops on a CPU machine;
    on a GPU machine it runs its phases (tests/test_kernels_cuda.py and the gpu-marked Triton tests)."""
    import os
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run its checks")
    script = Path(__file__).with_name("gpu_check.sh")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "torch sees no CUDA device" in r.stdout
    assert (tmp_path / "env.txt").read_text().startswith("torch ")
