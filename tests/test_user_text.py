"""What users read names no issue numbers: README.md, docs/, CLI output and help, test skip reasons.

Issue numbers belong to the project's tracker, not to the text a user reads;
"issue 7 targets" means nothing to someone who installed the package.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from shardopt import cli

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "shardopt"
# "issue 7", "issues 2 and 3", "GitHub issue #12", "the issue's targets"
ISSUE = re.compile(r"\bissues?\s*(?:#\s*)?\d+|\bthe issue's\b|\bGitHub #\d+", re.IGNORECASE)
# wording that only makes sense inside the project ("runs on the GPU machine")
INTERNAL = re.compile(r"\bthe GPU machine\b|\bsessions?\b", re.IGNORECASE)


def _hits(text: str, pattern=ISSUE) -> list[str]:
    return [m.group(0) for m in pattern.finditer(text)]


def _docstring_nodes(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _strings(path: Path):
    """(line, text) of every string literal in a module except docstrings (those are for developers)."""
    tree = ast.parse(path.read_text())
    skip = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def test_readme_and_docs_name_no_issue_numbers():
    bad = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            bad += [f"{f.relative_to(ROOT)}:{n}: {h!r} in {line.strip()[:100]!r}" for h in _hits(line)]
    assert not bad, "user-facing docs mention issue numbers:\n" + "\n".join(bad)


def test_cli_strings_name_no_issue_numbers():
    """Every message, help text and printed line the package can show (string literals outside docstrings)."""
    bad = []
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 30
    for f in files:
        for n, text in _strings(f):
            bad += [f"{f.relative_to(ROOT)}:{n}: {h!r} in {text[:100]!r}" for h in _hits(text)]
    assert not bad, "strings the CLI or the library can print mention issue numbers:\n" + "\n".join(bad)


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0, argv
    return capsys.readouterr().out


def test_cli_help_names_no_issue_numbers(capsys):
    pages = {" ".join(a): _help(a, capsys) for a in (
        ["--help"], *([name, "--help"] for name in cli.COMMANDS),
        *(["ckpt", c, "--help"] for c in ("inspect", "verify", "consolidate", "split", "convert")),
    )}
    bad = [f"shardopt {k}: {h!r}" for k, text in pages.items() for h in _hits(text) + _hits(text, INTERNAL)]
    assert not bad, bad


def _skip_reasons():
    for f in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func).rsplit(".", 1)[-1]
            if name not in ("skip", "skipif", "importorskip", "xfail"):
                continue
            for arg in [*node.args, *(k.value for k in node.keywords if k.arg == "reason")]:
                for sub in ast.walk(arg):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        yield f"{f.name}:{node.lineno}", sub.value


def test_skip_reasons_name_no_issue_numbers_or_internal_machines():
    reasons = list(_skip_reasons())
    assert any("CUDA" in r for _, r in reasons)  # the scan sees conftest's GPU skip
    bad = [f"{site}: {text!r}" for site, text in reasons if _hits(text) or _hits(text, INTERNAL)]
    assert not bad, bad


def test_the_pattern_catches_what_it_should():
    for text in ("issue 7 targets", "(issue 3)", "GitHub issue #12", "Against the issue's targets", "issues 2"):
        assert _hits(text), text
    for text in ("docs/quickstart.md#1-install", "all-to-all #1", "a tissue 3", "step 150", "#SBATCH"):
        assert not _hits(text), text
