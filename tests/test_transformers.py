"""Hugging Face Trainer (issue 13): shardopt.integrations.transformers, with a tiny Llama built from a LlamaConfig.

Two spawned jobs carry the multi-rank checks (tests/hf_trainer_job.py): one
torchrun at W=2 (ShardoptTrainer / ShardoptCallback for Lion, AdamW and Muon,
a plain Trainer, the state_dict refusals, the DeepSpeed config path, and the
example script), and one plain process at W=1 that resumes from the W=2
checkpoints (and the example's). The other tests run in this process.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

import shardopt  # noqa: E402
from shardopt.integrations import transformers as hf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JOB = Path(__file__).resolve().parent / "hf_trainer_job.py"
ALGOS = ("lion", "adamw", "muon")
DS_CASES = [f"{a}-{s}" for a in ALGOS for s in (1, 2)]
SHIPPED = "shipped-hf_trainer_zero2_muon.json"  # the Trainer-ready config in launch/deepspeed/


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(cmd, out: Path, mode: str, world: int, timeout: int):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    files = [out / f"{mode}_rank{r}.pt" for r in range(world)]
    # a non-zero exit after every rank saved its results is gloo's teardown abort, not a failure
    log = (proc.stdout + proc.stderr)[-8000:]
    assert all(f.exists() for f in files), f"{mode} job failed ({proc.returncode}):\n{log}"
    return [torch.load(f, weights_only=False) for f in files]


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no DeepSpeed here
        return False
    return True


@pytest.fixture(scope="module")
def w2(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_w2")
    cases = DS_CASES + [SHIPPED] if _has_deepspeed() else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(JOB), "w2",
           str(out), ",".join(cases)]
    return out, _launch(cmd, out, "w2", 2, timeout=900)


@pytest.fixture(scope="module")
def w1(w2, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_w1")
    (res,) = _launch([sys.executable, str(JOB), "w1", str(out), str(w2[0])], out, "w1", 1, timeout=300)
    return res


def _bitwise(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


# ---------------------------------------------------------------------------------------------- W=2 Trainer runs
@pytest.mark.slow
def test_resume_through_trainer_checkpoints_is_bitwise(w2):
    """train 10 = train 6, save, resume to 10, bitwise, for each entry point; every rank ends the same."""
    out, ranks = w2
    for r in ranks:
        assert r["layout"] == {a: "zero1" for a in ALGOS}  # sharded: Trainer's own rank-0 file would lose state
        for a in ALGOS:
            full, resumed, init = r["params"][f"{a}/full"], r["params"][f"{a}/resumed"], r["params"][f"{a}/step7"]
            assert _bitwise(resumed, full), (a, _max_rel(resumed, full))
            assert not _bitwise(full, init)  # steps 8-10 moved the parameters
            assert r["warnings"][f"{a}/full"] == [] and r["warnings"][f"{a}/resumed"] == []
        assert r["loss_calls"] == 4  # the user's Trainer subclass (ShardoptCallback) still runs its override
    assert _bitwise(ranks[0]["params"]["lion/full"], ranks[1]["params"]["lion/full"])
    # Trainer's checkpoint-6 holds every rank's part of the optimizer, not rank 0's optimizer.pt
    for a in ALGOS:
        files = ranks[0]["files"][a]
        assert hf.SHARDOPT_DIR in files and "optimizer.pt" not in files, files
        assert {"scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json",
                "model.safetensors"} <= set(files)
        ck = out / a / "checkpoint-6" / hf.SHARDOPT_DIR
        assert len(list(ck.glob("*.distcp"))) == 2  # both ranks wrote their part
    # the groups: Trainer's decay split (no decay for norms), lr from learning_rate / optim_args; Muon's aux groups
    g = ranks[0]["groups"]
    assert [x["weight_decay"] for x in g["lion"]] == [0.1, 0.0] and g["lion"][0]["betas"] == (0.9, 0.99)
    assert g["adamw"][0]["betas"] == (0.9, 0.95) and g["adamw"][0]["initial_lr"] == 1e-3
    assert [(x["algorithm"], x["weight_decay"], x["initial_lr"]) for x in g["muon"]] == [
        ("muon", 0.1, 2e-2), ("adamw", 0.1, 1e-3), ("adamw", 0.0, 1e-3)]
    assert g["muon"][0]["ns_dtype"] == torch.float32


@pytest.mark.slow
def test_optim_shardopt_muon_equals_muon_built_by_hand(w2):
    _, ranks = w2
    for r in ranks:
        assert _bitwise(r["params"]["muon/by_hand"], r["params"]["muon/full"])


@pytest.mark.slow
def test_resume_at_world_size_1_from_a_w2_trainer_checkpoint(w1, w2):
    """The parameters after step 7, resumed at W=1 from W=2's checkpoint-6, against W=2's own step 7."""
    _, ranks = w2
    assert w1["steps"] == {a: 7 for a in ALGOS}
    for a in ALGOS:
        err = _max_rel(w1["params"][a], ranks[0]["params"][f"{a}/step7"])
        assert err <= 1e-6, (a, err)
        assert w1["warnings"][a] == []
    assert w1["late_callback"].startswith("FileNotFoundError") and "optimizer.pt" in w1["late_callback"]


@pytest.mark.slow
def test_plain_trainer_warns_once_and_its_rank0_file_is_refused(w2):
    _, (r0, r1) = w2
    assert len(r0["warnings"]["plain"]) == 1 and r1["warnings"]["plain"] == []  # only rank 0 saves, once
    msg = r0["warnings"]["plain"][0]
    assert "rank 0 alone" in msg and "zero1 layout, world size 2" in msg and "ShardoptTrainer" in msg
    assert r0["warnings"]["direct"] == r1["warnings"]["direct"] == []  # a user's own state_dict() does not warn
    # Trainer loads that one file on every rank: rank 0 takes its own shard, rank 1 is refused by name
    assert r0["plain_load"] == "ok"
    assert "was saved by rank 0 of a zero1 layout with world size 2, but this is rank 1" in r1["plain_load"]
    assert "shardopt.integrations.transformers.ShardoptTrainer" in r1["plain_load"]
    # ShardoptTrainer resuming such a checkpoint raises on every rank, so no rank hangs in the first step
    assert r0["plain_resume"].startswith("RuntimeError: shardopt: rank 1 could not load")
    assert r1["plain_resume"].startswith("ValueError") and "saved by rank 0" in r1["plain_resume"]


@pytest.mark.slow
def test_refusal_at_equal_local_shapes(w2):
    """One 64-element parameter split in half at W=2: rank 1 is given rank 0's state, of the same local shape."""
    _, (r0, r1) = w2
    assert r0["half_local"] == r1["half_local"] == [(32,)]
    assert r0["half_load"] == "ok"
    assert "param_groups[0]['params'][0] (shape (64,)) was saved by rank 0" in r1["half_load"]
    assert "shardopt.checkpoint" in r1["half_load"]


@pytest.mark.slow
def test_deepspeed_config_in_training_arguments_trains_and_resumes(w2):
    if not _has_deepspeed():
        pytest.skip("DeepSpeed is not installed")
    _, ranks = w2
    for r in ranks:
        assert r["ds_warnings"] == []
        for case in DS_CASES:
            name, stage = case.split("-")
            assert r["stage"][case] == int(stage)  # Muon too: it runs on DeepSpeed's own partitions
            assert r["optimizer"][case] == {"lion": "Lion", "adamw": "AdamW", "muon": "Muon"}[name]
            assert r["global_step"][case] == 10
            full, resumed = r["ds_params"][f"{case}/full"], r["ds_params"][f"{case}/resumed"]
            assert _bitwise(resumed, full), (case, _max_rel(resumed, full))
            # against the same optimizer without DeepSpeed ("gradient_clipping": 0.0, max_grad_norm=0)
            plain = r["ds_params"][f"{name}/plain"]
            tol = {"lion": 0.0, "adamw": 1e-6, "muon": 2e-3}[name]
            assert _max_rel(full, plain) <= tol, (case, _max_rel(full, plain))
    assert _bitwise(ranks[0]["ds_params"]["muon-2/full"], ranks[1]["ds_params"]["muon-2/full"])
    # the shipped Trainer config: every value "auto" (from TrainingArguments), Muon on DeepSpeed's ZeRO-2 partitions
    r = ranks[0]
    assert r["stage"][SHIPPED] == 2 and r["optimizer"][SHIPPED] == "Muon" and r["global_step"][SHIPPED] == 10
    assert _bitwise(r["ds_params"][f"{SHIPPED}/resumed"], r["ds_params"][f"{SHIPPED}/full"])
    assert not _bitwise(r["ds_params"][f"{SHIPPED}/full"], r["ds_params"]["muon-2/full"])
    # optim="shardopt_*" with no "optimizer" in the config: both run on DeepSpeed's ZeRO-2 partitions
    assert r["client"]["shardopt_lion"] == (2, "Lion", "none")
    assert r["client"]["shardopt_muon"][:2] == (2, "Muon")


@pytest.mark.slow
def test_example_script_saves_at_w2_and_resumes_at_w1(w2, w1):
    """launch/examples/hf_trainer.py as docs/integrations.md runs it (fewer steps), run as __main__ by the jobs."""
    out, ranks = w2
    first, second = ranks[0]["example"], w1["example"]
    assert ranks[1]["example"] is None  # rank 0 reports
    assert first["world"] == 2 and first["global_step"] == 4 and first["resumed_from"] is None
    assert first["layout"] == "zero1" and math.isfinite(first["train_loss"])
    assert (out / "example" / "checkpoint-4" / hf.SHARDOPT_DIR).is_dir()
    assert second["world"] == 1 and second["global_step"] == 6 and second["resumed_from"] == "checkpoint-4"
    assert second["layout"] == "none" and math.isfinite(second["train_loss"])


# ---------------------------------------------------------------------------------------------- in this process
def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


def test_optim_names_are_training_arguments_and_cli_choices(tmp_path):
    for name in hf.OPTIM_NAMES:
        assert OptimizerNames(name) == name and _args(tmp_path, optim=name).optim == name
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "shardopt_muon", "--report_to", "none"])
    assert args.optim == OptimizerNames.SHARDOPT_MUON
    assert "shardopt_lion" in [m.value for m in OptimizerNames]
    hf.install()  # idempotent
    assert [m.value for m in OptimizerNames].count("shardopt_lion") == 1
    with pytest.raises(ValueError, match="is not a valid OptimizerNames"):
        _args(tmp_path, optim="shardopt_sgd")


def test_optim_args_parse_and_build(tmp_path):
    assert hf.parse_optim_args("betas=0.9,0.99, backend=torch,nesterov=false,ns_steps=4,aux=embed:lm_head,"
                               "ns_dtype=bf16,grad_clip_norm=none") == {
        "betas": (0.9, 0.99), "backend": "torch", "nesterov": False, "ns_steps": 4, "aux": ["embed", "lm_head"],
        "ns_dtype": torch.bfloat16, "grad_clip_norm": None}
    cls, kw = hf.shardopt_optimizer_cls_and_kwargs(_args(tmp_path, optim="shardopt_adamw", learning_rate=3e-4,
                                                         adam_beta2=0.95, optim_args="sharding=none"))
    assert cls is shardopt.AdamW and kw == {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "sharding": "none"}
    # Lion takes Trainer's adam_beta1/adam_beta2 as transformers' own Lion does; beta1=/beta2= (Trainer's parser) too
    cls, kw = hf.shardopt_optimizer_cls_and_kwargs(_args(tmp_path, optim="shardopt_lion", optim_args="beta2=0.99"))
    assert cls is shardopt.Lion and kw == {"lr": 5e-5, "betas": (0.9, 0.99)}
    with pytest.raises(ValueError, match=r"lr comes from TrainingArguments\(learning_rate"):
        hf.shardopt_optimizer_cls_and_kwargs(_args(tmp_path, optim="shardopt_lion", optim_args="lr=1e-3"))
    with pytest.raises(ValueError, match=r"weight_decay comes from TrainingArguments\(weight_decay"):
        hf.shardopt_optimizer_cls_and_kwargs(_args(tmp_path, optim="shardopt_muon", optim_args="weight_decay=0.1"),
                                             _tiny_llama())
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'momentum'; valid: .*betas"):
        hf.shardopt_optimizer_cls_and_kwargs(_args(tmp_path, optim="shardopt_lion", optim_args="momentum=0.9"))
    with pytest.raises(ValueError, match="expected comma-separated key=value pairs"):
        hf.parse_optim_args("0.9,betas=1")
    with pytest.raises(ValueError, match="needs the model"):
        hf.shardopt_optimizer_cls_and_kwargs(_args(tmp_path, optim="shardopt_muon"))


def test_muon_groups_follow_trainer_decay_rule(tmp_path):
    model = _tiny_llama()
    args = _args(tmp_path, optim="shardopt_muon", learning_rate=1e-3, weight_decay=0.05,
                 optim_args="lr=0.02,aux_weight_decay=0.01,adjust_lr_fn=match_rms_adamw")
    cls, kw = hf.get_optimizer_cls_and_kwargs(args, model)
    groups = kw.pop("params")
    assert cls is shardopt.Muon and kw == {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"}
    summary = [(g["algorithm"], g.get("lr"), g["weight_decay"], sorted(g["param_names"])) for g in groups]
    hidden = sorted(n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    norms = sorted(n for n, _ in model.named_parameters() if "norm" in n)
    assert summary == [("muon", None, 0.05, hidden),
                       ("adamw", 1e-3, 0.01, ["lm_head.weight", "model.embed_tokens.weight"]),
                       ("adamw", 1e-3, 0.0, norms)]
    opt = shardopt.Muon(groups, **kw)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_watch_is_silent_outside_a_trainer_save():
    """The warning hook looks for Trainer._save_optimizer_and_scheduler only; here none is on the stack."""
    from shardopt.integrations import _trainer_watch

    assert _trainer_watch.watch in shardopt.optim._state_dict.GLOBAL_STATE_DICT_POST_HOOKS
    opt = shardopt.Lion([torch.nn.Parameter(torch.zeros(4))])
    sd = opt.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trainer_watch.watch(opt, dict(sd, shardopt=dict(sd["shardopt"], layout="zero1", world_size=2)))
    assert hf.sharded_optimizer(opt) is opt
    assert hf.sharded_optimizer(torch.optim.SGD(opt.param_groups[0]["params"])) is None
