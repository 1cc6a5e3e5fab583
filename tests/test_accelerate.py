"""accelerate (issue 5): the configs in launch/accelerate/ with the scripts in launch/examples/.

DDP and DeepSpeed ZeRO-1/2 run for real through ``accelerate launch`` (2 CPU
processes, gloo): the loss falls, every rank ends with the same parameters,
and each rank holds about 1/W of the optimizer state. accelerate's FSDP2 does
not shard on CPU, so its config is parsed down to the FSDP plugin, not run.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launch_args: list[str], script: str, env_extra: dict) -> list[dict]:
    exe = shutil.which("accelerate")
    cmd = ([exe] if exe else [sys.executable, "-m", "accelerate.commands.launch"])
    if exe:
        cmd.append("launch")
    cmd += launch_args + ["--main_process_port", str(_free_port()), script, "--steps", str(STEPS)]
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + "\n" + proc.stderr
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{out[-6000:]}"
    dec, results = json.JSONDecoder(), []
    for piece in proc.stdout.split("RESULT ")[1:]:
        results.append(dec.raw_decode(piece)[0])
    assert sorted(r["rank"] for r in results) == list(range(WORLD)), out[-6000:]
    return results


def _check_training(results, state_per_param_byte: float):
    for r in results:
        assert r["world"] == WORLD
        assert r["loss_end"] < 0.97 * r["loss_start"], f"loss did not fall: {r['loss_start']} -> {r['loss_end']}"
    assert len({r["params_sha256"] for r in results}) == 1, "ranks ended with different parameters"
    full = state_per_param_byte * results[0]["param_bytes"]  # the unsharded optimizer state
    for r in results:
        assert r["state_bytes"] <= 0.55 * full + 1024, f"rank {r['rank']} holds {r['state_bytes']} of {full} bytes"
    assert sum(r["state_bytes"] for r in results) >= full  # nothing lost (padding may add a little)


def test_ddp_with_shardopt_zero1_optimizer():
    results = _launch(
        ["--config_file", "launch/accelerate/ddp.yaml", "--multi_gpu", "--num_processes", str(WORLD)],
        "launch/examples/accelerate_ddp.py", {"ACCELERATE_USE_CPU": "1"},
    )
    assert all(r["layout"] == "zero1" for r in results)
    _check_training(results, state_per_param_byte=1.0)  # Lion: one fp32 buffer per fp32 parameter


@pytest.mark.parametrize("stage,optimizer,state_per_param_byte", [
    (1, "shardopt.optim.lion.Lion", 1.0),
    (2, "shardopt.optim.adamw.AdamW", 2.0),
])
def test_deepspeed_config_names_shardopt_optimizer(stage, optimizer, state_per_param_byte):
    pytest.importorskip("deepspeed")
    results = _launch(
        ["--use_deepspeed", "--config_file", f"launch/accelerate/deepspeed_zero{stage}.yaml",
         "--num_processes", str(WORLD)],
        "launch/examples/accelerate_deepspeed.py", {"DS_ACCELERATOR": "cpu"},
    )
    for r in results:
        assert r["optimizer"] == optimizer and r["zero_stage"] == stage
    _check_training(results, state_per_param_byte)


def test_fsdp2_config_parses_to_an_fsdp2_plugin():
    """GPU-only to run (accelerate's FSDP2 does not shard on CPU): check the yaml reaches the FSDP2 plugin."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        args = launch_command_parser().parse_args(
            ["--config_file", "launch/accelerate/fsdp2.yaml", "launch/examples/accelerate_fsdp2.py"])
        args, defaults, _ = _validate_launch_command(args)
        env = prepare_multi_gpu_env(args)
    finally:
        os.chdir(cwd)
    assert defaults.distributed_type == DistributedType.FSDP
    assert args.num_processes == WORLD
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    compile(Path(ROOT / "launch/examples/accelerate_fsdp2.py").read_text(), "accelerate_fsdp2.py", "exec")
