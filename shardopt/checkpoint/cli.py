"""``shardopt ckpt``: inspect, verify, consolidate, split and convert checkpoints.

The top-level ``shardopt`` command calls :func:`add_ckpt_parser` and
:func:`run_ckpt`; ``python -m shardopt.checkpoint ...`` runs the same
commands on their own.
"""
from __future__ import annotations

import argparse
import json
import sys

COMMANDS = ("inspect", "verify", "consolidate", "split", "convert")


def _add_commands(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # also accepted after the command; SUPPRESS keeps it from resetting the value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = p.add_subparsers(dest="ckpt_cmd", metavar="COMMAND")
    sub.required = True

    def add(name, **kw):
        return sub.add_parser(name, parents=[common], **kw)

    s = add("inspect", help="table of parameters, shapes, dtypes, state keys, bytes, algorithm, "
                                      "world size and layout")
    s.add_argument("path", help="checkpoint directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = add("verify", help="check every stored tensor against its CRC-32")
    s.add_argument("path")

    s = add("consolidate", help="one torch.save file in torch.optim format (+ model weights)")
    s.add_argument("path", help="checkpoint directory")
    s.add_argument("out", help="output .pt file")

    s = add("split", help="the reverse of consolidate: a .pt file -> checkpoint directory")
    s.add_argument("pt", help="input .pt file (from consolidate, or a torch.optim state dict with param_names)")
    s.add_argument("path", help="output checkpoint directory")

    s = add("convert", help="to or from a DeepSpeed ZeRO-1/2/3 checkpoint, or to a DeepSpeed universal checkpoint",
                       description="shardopt ckpt convert --from deepspeed DS_DIR PATH\n"
                                   "shardopt ckpt convert --to deepspeed PATH DS_DIR --world-size M\n"
                                   "shardopt ckpt convert --to deepspeed-universal PATH DS_DIR",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--from", dest="src_fmt", choices=["deepspeed"], help="input format")
    g.add_argument("--to", dest="dst_fmt", choices=["deepspeed", "deepspeed-universal"],
                   help="output format: DeepSpeed ZeRO-1/2 rank files for --world-size M, or a universal checkpoint "
                        "(any world size and stage; load it with \"checkpoint\": {\"load_universal\": true})")
    s.add_argument("src", help="input: DeepSpeed checkpoint dir (--from) or shardopt checkpoint (--to)")
    s.add_argument("dst", help="output: shardopt checkpoint (--from) or DeepSpeed checkpoint dir (--to)")
    s.add_argument("--world-size", type=int, help="(--to) data-parallel world size the DeepSpeed run will use")
    s.add_argument("--tag", help="DeepSpeed tag (default: --from reads 'latest'; --to writes global_step<N>)")
    s.add_argument("--zero-stage", type=int, default=1, choices=[1, 2], help="(--to) ZeRO stage to record")
    s.add_argument("--parameter-alignment", action="store_true",
                   help="(--to) the DeepSpeed config sets zero_optimization.parameter_alignment")
    s.add_argument("--state-format", choices=["shardopt", "deepspeed"], default="shardopt",
                   help="(--to) state key names for a shardopt optimizer (default) or DeepSpeed's own Adam/Lion")
    s.add_argument("--algorithm", choices=["lion", "adamw", "muon"],
                   help="(--from) the algorithm, when the state keys do not tell")


def add_ckpt_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ckpt`` to a top-level ``argparse`` subparsers object; sets ``func=run_ckpt``."""
    p = subparsers.add_parser("ckpt", help="inspect, verify, consolidate, split and convert checkpoints",
                              description="World-size-agnostic shardopt checkpoints: offline tools.")
    _add_commands(p)
    p.set_defaults(func=run_ckpt)
    return p


def run_ckpt(args) -> int:
    """Run a parsed ``shardopt ckpt`` command; returns the exit status."""
    from . import ds_convert, offline
    from .errors import CheckpointError

    progress = not getattr(args, "no_progress", False) and sys.stderr.isatty()
    cmd = args.ckpt_cmd
    try:
        if cmd == "inspect":
            info = offline.inspect(args.path)
            if args.json:
                print(json.dumps(info, indent=1, default=str))
            else:
                print(offline.format_inspect(info))
            return 0
        if cmd == "verify":
            n, errors = offline.verify(args.path, progress=progress)
            if errors:
                for e in errors:
                    print(f"FAIL {e}", file=sys.stderr)
                print(f"{args.path}: {len(errors)} problem(s)", file=sys.stderr)
                return 1
            print(f"{args.path}: OK, {n} chunks verified")
            return 0
        if cmd == "consolidate":
            offline.consolidate(args.path, args.out, progress=progress)
            print(f"wrote {args.out}")
            return 0
        if cmd == "split":
            offline.split(args.pt, args.path, progress=progress)
            print(f"wrote {args.path}")
            return 0
        if cmd == "convert":
            if args.src_fmt == "deepspeed":
                ds_convert.from_deepspeed(args.src, args.dst, tag=args.tag, algorithm=args.algorithm,
                                          progress=progress)
                print(f"wrote {args.dst}")
                return 0
            if args.dst_fmt == "deepspeed-universal":
                out = ds_convert.to_deepspeed_universal(args.src, args.dst, tag=args.tag,
                                                        state_format=args.state_format, progress=progress)
                print(f"wrote {out} (DeepSpeed universal checkpoint)")
                return 0
            if not args.world_size:
                print("shardopt ckpt convert --to deepspeed needs --world-size M", file=sys.stderr)
                return 2
            out = ds_convert.to_deepspeed(args.src, args.dst, world_size=args.world_size, tag=args.tag,
                                          zero_stage=args.zero_stage, parameter_alignment=args.parameter_alignment,
                                          state_format=args.state_format, progress=progress)
            print(f"wrote {out} (DeepSpeed, world size {args.world_size})")
            return 0
    except BrokenPipeError:  # e.g. `shardopt ckpt inspect X | head`
        return 0
    except (CheckpointError, OSError, ValueError) as e:
        print(f"shardopt ckpt {cmd}: error: {e}", file=sys.stderr)
        return 1
    raise AssertionError(cmd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardopt.checkpoint",
                                description="World-size-agnostic shardopt checkpoints: offline tools.")
    _add_commands(p)
    args = p.parse_args(argv)
    return run_ckpt(args)
