"""``shardopt ckpt``: inspect, verify, consolidate, split and convert checkpoints.

The top-level ``shardopt`` command calls :func:`add_ckpt_parser` and
:func:`run_ckpt`; ``python -m shardopt.checkpoint ...`` runs the same
commands on their own.
"""
from __future__ import annotations

import argparse
import json
import os
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
    s.add_argument("path", help="checkpoint directory, or a folder of checkpoints (each is inspected)")
    s.add_argument("--json", action="store_true", help="machine-readable output, with exact byte counts")

    s = add("verify", help="check every stored tensor against its CRC-32")
    s.add_argument("path", help="checkpoint directory, or a folder of checkpoints (each is verified)")

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
        # a folder of checkpoints (shardopt demo writes one per optimizer): inspect and verify take each
        # one in turn; the commands that read one checkpoint ask which
        src = {"inspect": "path", "verify": "path", "consolidate": "path"}.get(cmd)
        if cmd == "convert" and args.dst_fmt == "deepspeed":
            src = "src"
        inside = offline.folder_of_checkpoints(getattr(args, src)) if src else []
        if inside and cmd in ("consolidate", "convert"):
            raise CheckpointError(_which_one(args, cmd, src, inside))
        if cmd == "inspect":
            if not inside:
                info = offline.inspect(args.path)
                print(json.dumps(info, indent=1, default=str) if args.json else offline.format_inspect(info))
                return 0
            infos = [offline.inspect(c) for c in inside]
            if args.json:
                print(json.dumps({"folder": args.path, "checkpoints": infos}, indent=1, default=str))
                return 0
            print(f"{args.path} is a folder of {len(inside)} checkpoints: "
                  f"{', '.join(os.path.basename(c) for c in inside)}; inspecting each")
            for info in infos:
                print()
                print(offline.format_inspect(info))
            return 0
        if cmd == "verify":
            if inside:
                print(f"{args.path} is a folder of {len(inside)} checkpoints: "
                      f"{', '.join(os.path.basename(c) for c in inside)}; verifying each")
            bad = 0
            for path in inside or [args.path]:
                bad += _verify_one(offline, path, progress)
            if inside:
                print(f"{args.path}: {len(inside) - bad} of {len(inside)} checkpoints OK",
                      file=sys.stderr if bad else sys.stdout)
            return 1 if bad else 0
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


def _verify_one(offline, path: str, progress: bool) -> int:
    """Verify one checkpoint and print its verdict; 1 if it has problems."""
    n, errors = offline.verify(path, progress=progress)
    if errors:
        for e in errors:
            print(f"FAIL {e}", file=sys.stderr)
        print(f"{path}: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    print(f"{path}: OK, {n} chunks verified")
    return 0


def _which_one(args, cmd: str, src: str, inside: list[str]) -> str:
    names = ", ".join(os.path.basename(c) for c in inside)
    folder = getattr(args, src)
    if cmd == "consolidate":
        example = f"shardopt ckpt consolidate {inside[0]} {args.out}"
    else:
        example = f"shardopt ckpt convert --to deepspeed {inside[0]} {args.dst} --world-size {args.world_size or 'M'}"
    return (f"{folder} is a folder of {len(inside)} checkpoints ({names}); {cmd} takes one of them, "
            f"e.g. {example}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardopt.checkpoint",
                                description="World-size-agnostic shardopt checkpoints: offline tools.")
    _add_commands(p)
    args = p.parse_args(argv)
    return run_ckpt(args)
