"""Every `dask-rag ...` line in the README's code blocks parses with today's command line (its
optional ``[...]`` parts each in turn, ``a | b`` alternatives each in turn); `bench` lines are
also parsed by the benchmark they hand their options to.  A documented option that no longer
exists fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")


def documented_lines() -> list[str]:
    lines, inside = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        text = line.strip().removeprefix("$ ")
        if inside and text.startswith("dask-rag "):
            lines.append(text)
    return lines


def variants(line: str) -> list[list[str]]:
    """The line without its optional parts, then with each optional alternative alone."""
    groups = _OPTIONAL.findall(line)
    bare = _OPTIONAL.sub(" ", line)
    out = [bare]
    for i, group in enumerate(groups):
        for alternative in group.split(" | "):
            seen = 0

            def keep(m: re.Match[str], i: int = i, alternative: str = alternative) -> str:
                nonlocal seen
                seen += 1
                return f" {alternative} " if seen - 1 == i else " "

            out.append(_OPTIONAL.sub(keep, line))
    # placeholders: a count N
    return [[("4" if tok == "N" else tok) for tok in shlex.split(v, comments=True)][1:]
            for v in out]


def test_the_readme_documents_commands():
    commands = {line.split()[1] for line in documented_lines()}
    assert {"ingest", "search", "ask", "serve", "eval", "bench"} <= commands


@pytest.mark.parametrize("line", documented_lines())
def test_documented_command_line_parses(line):
    from dask_rag.cli import parse_args

    for argv in variants(line):
        args = parse_args(argv)
        if args.command == "bench":
            from benchmarks.ab_pipeline import build_parser

            build_parser().parse_args(args.bench_args)
