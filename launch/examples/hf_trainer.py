"""Hugging Face Trainer with a sharded shardopt optimizer, saved and resumed through Trainer's own checkpoints.

A tiny Llama (random init from a ``LlamaConfig``, nothing downloaded) learns the
bytes of the text that ships with shardopt. ``--optim`` is a
``TrainingArguments.optim`` name that ``shardopt.integrations.transformers``
adds; Trainer builds the optimizer (decay/no-decay groups, Muon's aux group)
and ``ShardoptTrainer`` writes every rank's part of its state into each
``checkpoint-N/``. ``--resume`` continues from the newest checkpoint in
``--output-dir``, at any world size.

    torchrun --nproc-per-node 2 launch/examples/hf_trainer.py --optim shardopt_muon --max-steps 20
    python launch/examples/hf_trainer.py --optim shardopt_muon --max-steps 30 --resume    # on 1 process now
    torchrun --nproc-per-node 2 launch/examples/hf_trainer.py --deepspeed launch/deepspeed/zero1_muon.json

On CPU the script runs with gloo (``use_cpu``); with CUDA each rank takes its GPU.
Rank 0 prints one ``RESULT {...}`` line at the end.
"""
import argparse
import importlib.resources
import json
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from shardopt.integrations.transformers import ShardoptTrainer, sharded_optimizer

# Per-optimizer settings: learning_rate is the Lion/AdamW lr and Muon's aux-group lr; optim_args sets the rest.
DEFAULTS = {
    "shardopt_lion": dict(learning_rate=1e-4, optim_args="betas=0.9,0.99"),
    "shardopt_adamw": dict(learning_rate=1e-3, optim_args=""),
    "shardopt_muon": dict(learning_rate=1e-3, optim_args="lr=0.02"),
}


class ByteChunks(torch.utils.data.Dataset):
    """Fixed-length windows of the bytes of shardopt/data/tinytales.txt (vocabulary: 256 byte values)."""

    def __init__(self, length: int = 64):
        text = importlib.resources.files("shardopt").joinpath("data/tinytales.txt").read_bytes()
        data = torch.tensor(list(text), dtype=torch.long)
        n = (len(data) - 1) // length
        self.x = data[: n * length].view(n, length)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}  # the model shifts the labels itself


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optim", choices=sorted(DEFAULTS), default="shardopt_muon")
    ap.add_argument("--optim-args", default=None, help="overrides the per-optimizer default, e.g. 'betas=0.9,0.95'")
    ap.add_argument("--learning-rate", type=float, default=None)
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--save-steps", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=16, help="split over the ranks")
    ap.add_argument("--output-dir", default="hf_trainer_out")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    ap.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON naming a shardopt.* optimizer (then --optim "
                                                      "is not used)")
    a = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.global_batch % world:
        sys.exit(f"--global-batch {a.global_batch} does not split over {world} ranks")
    d = DEFAULTS[a.optim]
    args = TrainingArguments(
        output_dir=a.output_dir,
        optim=a.optim,
        optim_args=d["optim_args"] if a.optim_args is None else a.optim_args,
        learning_rate=d["learning_rate"] if a.learning_rate is None else a.learning_rate,
        weight_decay=0.1,  # Trainer's rule: not for biases and norms
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_steps=a.max_steps,
        save_steps=a.save_steps,
        per_device_train_batch_size=a.global_batch // world,
        logging_steps=5,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        deepspeed=a.deepspeed,
        seed=0,
    )
    trainer = ShardoptTrainer(model=tiny_llama(), args=args, train_dataset=ByteChunks())
    resume = get_last_checkpoint(a.output_dir) if a.resume else None
    if a.resume and resume is None:
        sys.exit(f"--resume: no checkpoint-N folder in {a.output_dir}")
    out = trainer.train(resume_from_checkpoint=resume)

    if trainer.is_world_process_zero():
        opt = sharded_optimizer(trainer.optimizer)
        result = {"world": world, "optim": a.optim, "global_step": trainer.state.global_step,
                  "resumed_from": os.path.basename(resume) if resume else None, "train_loss": out.training_loss,
                  "layout": opt.layout.name if opt is not None else None,
                  "state_bytes_rank0": opt.state_bytes() if opt is not None else None}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
