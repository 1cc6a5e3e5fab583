"""The ``shardopt`` console script: ``shardopt demo | bench | ckpt | plan``.

Each subcommand lives in its own module and is imported only when it is the
one being run, so a missing optional piece (say, the benchmark tool) breaks
only its own command. Usage mistakes and user-facing failures print one line
and exit non-zero; ``SHARDOPT_DEBUG=1`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, function adding the subparser, function running it, one-line help)
COMMANDS = {
    "demo": ("shardopt.tools.demo", "add_parser", "run",
             "train a small GPT with Lion/AdamW/Muon on 2 CPU ranks, compare them, checkpoint and resume"),
    "bench": ("shardopt.tools.bench", "add_parser", "run",
              "benchmark optimizer steps: kernels, layouts, memory"),
    "ckpt": ("shardopt.checkpoint.cli", "add_ckpt_parser", "run_ckpt",
             "inspect, reshard, consolidate or split a shardopt checkpoint"),
    "plan": ("shardopt.tools.plan", "add_parser", "run",
             "per-rank memory, communication and Newton-Schulz load of a run, from 1 to 4096+ ranks"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (try '{self.prog} --help')\n")


def _debug() -> bool:
    return os.environ.get("SHARDOPT_DEBUG", "0").lower() not in ("", "0", "false", "no")


def _load(name: str):
    """Import a command's module; return it, or the one-line reason it is unavailable."""
    mod_name = COMMANDS[name][0]
    try:
        return importlib.import_module(mod_name), None
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            return None, f"'shardopt {name}' is not available in this install ({mod_name} is missing)"
        return None, f"'shardopt {name}' cannot start: {e} (pip install the missing package)"
    except ImportError as e:
        return None, f"'shardopt {name}' cannot start: {e}"


def _selected(argv: list[str]) -> str | None:
    """The subcommand named on the command line: the first word that is not an option."""
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str]):
    """The parser, with the real subparser for the selected command and placeholders for the rest."""
    from . import __version__

    parser = _Parser(prog="shardopt", description="Sharded, fused Lion / AdamW / Muon for PyTorch data parallelism.")
    parser.add_argument("--version", action="version", version=f"shardopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser)
    parser.subparsers = sub
    chosen = _selected(argv)
    runners, unavailable = {}, {}
    for name, (_, add_fn, run_fn, help_text) in COMMANDS.items():
        if name == chosen:
            mod, why = _load(name)
            if mod is not None:
                getattr(mod, add_fn)(sub)
                runners[name] = getattr(mod, run_fn)
                continue
            unavailable[name] = why
        # not selected (or unavailable): a placeholder that lists it in --help
        sub.add_parser(name, help=help_text, add_help=False)
    return parser, runners, unavailable


def main(argv: list[str] | None = None) -> int:
    from .tools import CommandError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser, runners, unavailable = build_parser(argv)
    # known args first: an unavailable command must report itself, not its flags
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in unavailable:
        print(f"shardopt {args.command}: error: {unavailable[args.command]}", file=sys.stderr)
        return 1
    if rest:
        parser.subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        rc = runners[args.command](args)
    except KeyboardInterrupt:
        print(f"shardopt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, Exception) as e:  # noqa: BLE001 - one line for users, the traceback on request
        if _debug():
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, CommandError):
            msg = f"{type(e).__name__}: {msg} (SHARDOPT_DEBUG=1 shows the traceback)"
        print(f"shardopt {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
