"""Trainer runs for tests/test_transformers.py, started by torchrun (W=2) or plain python (W=1).

    torchrun --nproc-per-node 2 hf_trainer_job.py w2 OUT [CASES]
    python hf_trainer_job.py w1 OUT CKPT_ROOT

``w2`` (W=2): for Lion, AdamW and Muon, train 10 steps (a checkpoint at step
6, the parameters after step 7 recorded), then resume a fresh model from
checkpoint-6 to step 10; Muon also built by hand; a plain Trainer's rank-0
save, and the load_state_dict refusals. With CASES (``lion-1,muon-2,...``) it
then trains each named in a DeepSpeed config at that ZeRO stage (``shipped-<file>``:
a JSON file of launch/deepspeed/), resumes it
through the engine's checkpoints, and runs each algorithm without DeepSpeed.
``w1`` (W=1): resume each optimizer from the W=2 checkpoint-6 in CKPT_ROOT and
stop after step 7. Both also run launch/examples/hf_trainer.py as ``__main__``:
4 steps at W=2, then ``--resume`` to 6 at W=1. Every rank writes OUT/<mode>_rank<R>.pt: parameters by run
and what it saw.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import (LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments, get_linear_schedule_with_warmup)

import shardopt  # noqa: E402
from shardopt.integrations.transformers import ShardoptCallback, ShardoptTrainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "launch", "examples", "hf_trainer.py")
STEPS, SAVE, PROBE = 10, 6, 7
LR = {"lion": 1e-3, "adamw": 1e-3, "muon": 1e-3}
MUON_LR = 2e-2
WD = 0.1


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=96, length=16, vocab=128):
        self.x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Probe(TrainerCallback):
    """Record the parameters after step PROBE; with ``stop``, end the run there (the schedule still spans STEPS)."""

    def __init__(self, stop=False):
        self.stop, self.params = stop, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == PROBE:
            self.params = params_of(model.module if hasattr(model, "module") else model)
            if self.stop:
                control.should_training_stop = True
        return control


class MyTrainer(Trainer):
    """A user's own Trainer subclass (ShardoptCallback's audience)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.loss_calls = getattr(self, "loss_calls", 0) + 1
        return super().compute_loss(model, inputs, *args, **kwargs)


def targs(out, world, **kw):
    per_device = 8 // world  # the same global batch of 8 at any world size
    base = dict(output_dir=out, max_steps=STEPS, save_steps=SAVE, per_device_train_batch_size=per_device,
                learning_rate=1e-3, weight_decay=WD, report_to=[], logging_steps=1000, use_cpu=True,
                disable_tqdm=True, seed=0, dataloader_num_workers=0, save_only_model=False)
    base.update(kw)
    return TrainingArguments(**base)


def shardopt_warnings(caught):
    msgs = [str(w.message) for w in caught]
    return [m for m in msgs if m.startswith("shardopt:") and "optimizer.pt" in m]


def decay_groups(model, wd):
    """Trainer's decay/no-decay split, by hand: no decay for norms (the tiny Llama has no biases)."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "norm" not in n], "weight_decay": wd},
            {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}]


def muon_groups_by_hand(model):
    """What optim="shardopt_muon" should build: muon_param_groups + Trainer's weight-decay rule."""
    mu, aux = shardopt.muon_param_groups(model, aux_lr=LR["muon"])
    out = [dict(mu, weight_decay=WD)]
    for decayed in (True, False):
        keep = [k for k, n in enumerate(aux["param_names"]) if ("norm" not in n) == decayed]
        out.append(dict(aux, params=[aux["params"][k] for k in keep], param_names=[aux["param_names"][k] for k in keep],
                        weight_decay=WD if decayed else 0.0))
    return out


def build(name, model, out, world, trainer_cls=ShardoptTrainer, by_hand=False, callbacks=(), **kw):
    """One Trainer for optimizer ``name``, each through another entry point."""
    cbs = list(callbacks)
    if name == "lion":  # TrainingArguments.optim, tuple-valued optim_args; a user's subclass + ShardoptCallback
        args = targs(out, world, optim="shardopt_lion", optim_args="betas=0.9,0.99", learning_rate=LR["lion"], **kw)
        return MyTrainer(model=model, args=args, train_dataset=Tokens(), callbacks=cbs + [ShardoptCallback()])
    if name == "adamw":
        args = targs(out, world, learning_rate=LR["adamw"], **kw)
        if by_hand:  # optimizers=(opt, sched)
            opt = shardopt.AdamW(decay_groups(model, WD), lr=LR["adamw"], betas=(0.9, 0.95), eps=1e-8)
            sched = get_linear_schedule_with_warmup(opt, 0, STEPS)
            return trainer_cls(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched), callbacks=cbs)
        return trainer_cls(model=model, args=args, train_dataset=Tokens(), callbacks=cbs,
                           optimizer_cls_and_kwargs=(shardopt.AdamW, {"lr": LR["adamw"], "betas": (0.9, 0.95),
                                                                       "eps": 1e-8}))
    if name == "muon":
        args = targs(out, world, optim="shardopt_muon", optim_args=f"lr={MUON_LR},ns_dtype=fp32",
                     learning_rate=LR["muon"], **kw)
        if by_hand:
            opt = shardopt.Muon(muon_groups_by_hand(model), lr=MUON_LR, ns_dtype=torch.float32)
            return trainer_cls(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None), callbacks=cbs)
        return trainer_cls(model=model, args=args, train_dataset=Tokens(), callbacks=cbs)
    raise ValueError(name)


def run(trainer, resume=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    return shardopt_warnings(caught)


def mode_trainer(out, rank, world):
    res = {"rank": rank, "world": world, "params": {}, "warnings": {}, "files": {}, "layout": {}}
    for name in ("lion", "adamw", "muon"):
        root = os.path.join(out, name)
        probe = Probe()
        model = tiny_llama()
        tr = build(name, model, root, world, callbacks=[probe])
        res["warnings"][f"{name}/full"] = run(tr)
        res["layout"][name] = shardopt.integrations.transformers.sharded_optimizer(tr.optimizer).layout.name
        res["groups"] = res.get("groups", {}) | {name: [
            {k: v for k, v in g.items() if k not in ("params", "param_names")}
            for g in shardopt.integrations.transformers.sharded_optimizer(tr.optimizer).param_groups]}
        res["params"][f"{name}/full"] = params_of(model)
        res["params"][f"{name}/step{PROBE}"] = probe.params
        dist.barrier()
        res["files"][name] = sorted(os.listdir(os.path.join(root, f"checkpoint-{SAVE}")))
        model = tiny_llama()
        tr = build(name, model, os.path.join(out, f"{name}_resumed"), world, by_hand=(name == "adamw"))
        res["warnings"][f"{name}/resumed"] = run(tr, os.path.join(root, f"checkpoint-{SAVE}"))
        res["params"][f"{name}/resumed"] = params_of(model)
        if name == "lion":
            res["loss_calls"] = tr.loss_calls  # the subclass's own override still runs
    # optim="shardopt_muon" against shardopt.Muon built by hand
    model = tiny_llama()
    run(build("muon", model, os.path.join(out, "muon_by_hand"), world, by_hand=True))
    res["params"]["muon/by_hand"] = params_of(model)

    # A plain Trainer with a sharded optimizer: one warning on the rank that saves, and its file refused elsewhere.
    model = tiny_llama()
    opt = shardopt.Lion(model.parameters(), lr=1e-3)
    plain = os.path.join(out, "plain")
    tr = Trainer(model=model, args=targs(plain, world, max_steps=3, save_steps=3), train_dataset=Tokens(),
                 optimizers=(opt, None))
    res["warnings"]["plain"] = run(tr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        own = opt.state_dict()  # the user's own call: legitimate, no warning
        res["warnings"]["direct"] = [str(w.message) for w in caught if str(w.message).startswith("shardopt")]
    dist.barrier()
    saved = torch.load(os.path.join(plain, "checkpoint-3", "optimizer.pt"), weights_only=True)
    try:
        opt.load_state_dict(saved)
        res["plain_load"] = "ok"
    except ValueError as e:
        res["plain_load"] = str(e)
    # ShardoptTrainer resuming that checkpoint: every rank raises together (none hangs in the first step)
    try:
        run(ShardoptTrainer(model=tiny_llama(), args=targs(os.path.join(out, "plain_resumed"), world),
                            train_dataset=Tokens(), optimizers=(shardopt.Lion(tiny_llama().parameters(), lr=1e-3),
                                                                None)),
            os.path.join(plain, "checkpoint-3"))
        res["plain_resume"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported to the test
        res["plain_resume"] = f"{type(e).__name__}: {e}"
    del own

    # Equal local shapes: one parameter of 2 x 32 fp32 elements (ZeRO-1 aligns to 128 bytes) split in half at W=2;
    # rank 1 is handed rank 0's state_dict.
    p = torch.nn.Parameter(torch.arange(64, dtype=torch.float32))
    half = shardopt.Lion([p], lr=1e-2)
    p.grad = torch.ones(64)
    half.step()
    sds = [None] * world
    dist.all_gather_object(sds, half.state_dict())
    res["half_local"] = [tuple(v.shape) for v in half.state[p].values() if torch.is_tensor(v)]
    try:
        half.load_state_dict(sds[0])
        res["half_load"] = "ok"
    except ValueError as e:
        res["half_load"] = str(e)
    return res


def mode_w1(out, ckpt_root):
    res = {"params": {}, "warnings": {}}
    for name in ("lion", "adamw", "muon"):
        probe = Probe(stop=True)
        model = tiny_llama()
        tr = build(name, model, os.path.join(out, name), 1, callbacks=[probe])
        res["warnings"][name] = run(tr, os.path.join(ckpt_root, name, f"checkpoint-{SAVE}"))
        res["params"][name] = probe.params
        res["steps"] = res.get("steps", {}) | {name: tr.state.global_step}
    # Trainer's own load (here: ShardoptCallback added after the Trainer was built, too late for the resume) fails
    # loudly on a checkpoint with shardopt_optimizer/ instead of resuming with a fresh optimizer and schedule
    tr = MyTrainer(model=tiny_llama(), args=targs(os.path.join(out, "late"), 1, optim="shardopt_lion"),
                   train_dataset=Tokens())
    tr.add_callback(ShardoptCallback())
    try:
        tr.train(resume_from_checkpoint=os.path.join(ckpt_root, "lion", f"checkpoint-{SAVE}"))
        res["late_callback"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported to the test
        res["late_callback"] = f"{type(e).__name__}: {e}"
    return res


# Trainer checks a DeepSpeed config's optimizer lr, betas, eps and weight_decay against its own arguments
# (learning_rate, adam_beta1/adam_beta2, adam_epsilon, weight_decay), for shardopt types too: "auto" takes them.
DS_ARGS = {"lion": dict(learning_rate=LR["lion"], adam_beta2=0.99),
           "adamw": dict(learning_rate=LR["adamw"], adam_beta2=0.95),
           "muon": dict(learning_rate=MUON_LR)}


def ds_config(name, stage):
    params = {"lion": {"lr": "auto", "betas": "auto", "weight_decay": "auto"},
              "adamw": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
              "muon": {"lr": "auto", "weight_decay": "auto", "ns_dtype": "fp32", "aux_lr": LR["muon"]}}[name]
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
            "optimizer": {"type": {"lion": "shardopt.Lion", "adamw": "shardopt.AdamW", "muon": "shardopt.Muon"}[name],
                          "params": params}}


def ds_args(out, world, name, stage):
    if name == "shipped":  # launch/deepspeed/<stage>: all "auto", Trainer's defaults (clipping at max_grad_norm)
        return targs(out, world, learning_rate=1e-3, deepspeed=os.path.join(ROOT, "launch", "deepspeed", stage))
    return targs(out, world, max_grad_norm=0.0, deepspeed=ds_config(name, int(stage)), **DS_ARGS[name])


def plain_reference(name, model):
    """The same optimizer as the DeepSpeed config builds (one group, or muon_param_groups), without DeepSpeed."""
    if name == "lion":
        return shardopt.Lion(model.parameters(), lr=LR["lion"], betas=(0.9, 0.99), weight_decay=WD)
    if name == "adamw":
        return shardopt.AdamW(model.parameters(), lr=LR["adamw"], betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    return shardopt.Muon(shardopt.muon_param_groups(model, aux_lr=LR["muon"]), lr=MUON_LR, weight_decay=WD,
                         ns_dtype=torch.float32)


def mode_deepspeed(out, rank, world, cases):
    res = {"ds_params": {}, "stage": {}, "optimizer": {}, "ds_warnings": [], "global_step": {}}
    for name in ("lion", "adamw", "muon"):
        model = tiny_llama()
        args = targs(os.path.join(out, f"{name}_plain"), world, max_grad_norm=0.0, **DS_ARGS[name])
        res["ds_warnings"] += run(ShardoptTrainer(model=model, args=args, train_dataset=Tokens(),
                                                  optimizers=(plain_reference(name, model), None)))
        res["ds_params"][f"{name}/plain"] = params_of(model)
    for case in cases:
        name, stage = case.split("-")
        root = os.path.join(out, case)
        model = tiny_llama()
        tr = ShardoptTrainer(model=model, args=ds_args(root, world, name, stage), train_dataset=Tokens())
        res["ds_warnings"] += run(tr)
        engine = tr.model_wrapped
        res["stage"][case] = engine.zero_optimization_stage()
        res["optimizer"][case] = type(engine.basic_optimizer).__name__
        res["ds_params"][f"{case}/full"] = params_of(model)
        model = tiny_llama()
        tr = ShardoptTrainer(model=model, args=ds_args(os.path.join(out, f"{case}_resumed"), world, name, stage),
                             train_dataset=Tokens())
        res["ds_warnings"] += run(tr, os.path.join(root, f"checkpoint-{SAVE}"))
        res["ds_params"][f"{case}/resumed"] = params_of(model)
        res["global_step"][case] = tr.state.global_step
    # No "optimizer" in the config: Trainer builds optim="shardopt_*" and hands it to DeepSpeed as its client optimizer
    res["client"] = {}
    for optim in ("shardopt_lion", "shardopt_muon"):
        cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
               "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
        try:
            tr = ShardoptTrainer(model=tiny_llama(), train_dataset=Tokens(),
                                 args=targs(os.path.join(out, optim), world, optim=optim, deepspeed=cfg, max_steps=2))
            run(tr)
            engine = tr.model_wrapped
            res["client"][optim] = (engine.zero_optimization_stage(), type(engine.basic_optimizer).__name__,
                                    engine.basic_optimizer.sharding)
        except NotImplementedError as e:
            res["client"][optim] = str(e)
    return res


def run_example(out, *argv):
    """Run launch/examples/hf_trainer.py as its own __main__ in this process; rank 0's RESULT line, parsed."""
    buf, saved = io.StringIO(), sys.argv
    sys.argv = [EXAMPLE, "--optim", "shardopt_muon", "--save-steps", "2", "--output-dir", os.path.join(out, "example"),
                *argv]
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(EXAMPLE, run_name="__main__")
    finally:
        sys.argv = saved
    lines = [x for x in buf.getvalue().splitlines() if x.startswith("RESULT ")]
    return json.loads(lines[0][len("RESULT "):]) if lines else None


def main():
    mode, out = sys.argv[1], sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "w1":
        res, rank = mode_w1(out, sys.argv[3]), 0
        res["example"] = run_example(sys.argv[3], "--max-steps", "6", "--resume")
    else:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        res = mode_trainer(out, rank, world)
        res["example"] = run_example(out, "--max-steps", "4")
        cases = [c for c in (sys.argv[3] if len(sys.argv) > 3 else "").split(",") if c]
        if cases:
            res.update(mode_deepspeed(out, rank, world, cases))
    torch.save(res, os.path.join(out, f"{mode}_rank{rank}.pt"))
    shardopt.exit_distributed()  # barrier, destroy, and exit without the interpreter's finalisation


if __name__ == "__main__":
    main()
