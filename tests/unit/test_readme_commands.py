"""Every ``dx ...`` command the documentation shows is one the CLI accepts.

The command lines come from the Markdown files users read: every line of a fenced code block
that runs ``dx`` (also after ``&&``, ``|`` or ``;``), and every inline code span that starts with
``dx``. Each is parsed by click, the parser the real ``dx`` uses (``typer.main.get_command``),
without running anything: placeholders such as ``ROUTE`` or ``ID`` pass where a value goes, but
an unknown command, an unknown option or an extra argument fails.

Inline spans are usage lines as much as examples, so two pieces of usage notation are read:
``a\\|b c`` (a Markdown table's escaped ``|``) means ``a`` or ``b c`` in that place, and ``[...]``
marks optional parts, which are checked as if given. A placeholder in a command's place
(``dx COMMAND --help``) stands for every subcommand; ``dx ...`` is prose and skipped.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main

from pipeline.cli.main import app

REPO = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "CONTRIBUTING.md", "connectors/README.md")

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`(dx(?: [^`]*)?)`(?!`)")
SHELL_BREAKS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "(", ")"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class Example:
    where: str  # file:line
    text: str  # the command as written
    argv: tuple[str, ...]  # words after `dx`


def _code_block_commands(path: Path, text: str) -> list[Example]:
    found: list[Example] = []
    for block in FENCE.finditer(text):
        if block.group(1).strip() not in ("", "bash", "sh", "shell", "console"):
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        for offset, raw in enumerate(block.group(2).splitlines()):
            line = raw.strip().removeprefix("$ ")
            if "dx" not in line.split():
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            segment: list[str] = []
            for word in [*lexer, ";"]:
                if word in SHELL_BREAKS:
                    if segment and segment[0] == "dx":
                        found.append(Example(f"{path.name}:{first + offset}", line,
                                             tuple(segment[1:])))
                    segment = []
                else:
                    segment.append(word)
    return found


def _inline_commands(path: Path, text: str) -> list[Example]:
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found: list[Example] = []
    for span in INLINE.finditer(prose):
        command = span.group(1)
        where = f"{path.name}:{prose.count(chr(10), 0, span.start()) + 1}"
        for variant in _alternatives(command):
            words = shlex.split(variant.replace("[", " ").replace("]", " "))
            # shell redirections and pipes end the dx command (`dx tasks export ... > out.csv`)
            for i, word in enumerate(words):
                if word in SHELL_BREAKS:
                    words = words[:i]
                    break
            if len(words) > 1 and words[1] == "...":
                continue
            found.append(Example(where, command, tuple(words[1:])))
    return found


def _alternatives(command: str) -> list[str]:
    """``dx inbound serve\\|pull ROUTE`` -> ``dx inbound serve``, ``dx inbound pull ROUTE``: each
    alternative replaces the last word before the first ``\\|`` and runs to the next one."""
    first, *others = command.split("\\|")
    prefix = first.split()[:-1]
    return [first, *(" ".join([*prefix, other.strip()]) for other in others)]


def _examples() -> list[Example]:
    examples: list[Example] = []
    for name in DOCS:
        path = REPO / name
        text = path.read_text()
        examples += _code_block_commands(path, text) + _inline_commands(path, text)
    return examples


def _parse_errors(command: Any, name: str, args: list[str], parent: Any = None) -> list[str]:
    """Why the CLI's parser would refuse ``args`` for ``command`` (empty when it accepts them).

    ``command`` is typer's click command (typer ships its own copy of click, so this goes by
    the click API rather than by click's classes)."""
    try:
        # Resilient parsing runs no callbacks and tolerates placeholders where values go, but it
        # also swallows unknown options: those come from the option parser itself, run strictly.
        ctx = command.make_context(name, list(args), parent=parent, resilient_parsing=True)
        strict = command.context_class(command, info_name=name, parent=parent)
        command.make_parser(strict).parse_args(list(args))
    except Exception as err:  # click's UsageError and its kin: NoSuchOption, BadOptionUsage
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        return [f"{message} ('{name}')"]
    if not hasattr(command, "list_commands"):
        return [f"unexpected extra arguments {ctx.args} for '{ctx.command_path}'"] if ctx.args \
            else []
    # A group leaves the subcommand and its arguments where click's Group.invoke finds them.
    rest = [*ctx._protected_args, *ctx.args]
    if not rest:
        return []  # a group alone (`dx capture`) shows its help
    head, tail = rest[0], rest[1:]
    if PLACEHOLDER.match(head) and command.get_command(ctx, head) is None:
        names = command.list_commands(ctx)  # `dx COMMAND --help`: every command
    else:
        names = [head]
    errors: list[str] = []
    for sub in names:
        resolved = command.get_command(ctx, sub)
        if resolved is None:
            return [f"no such command {sub!r} in '{ctx.command_path}'"]
        errors += _parse_errors(resolved, sub, tail, ctx)
    return errors


EXAMPLES = _examples()


def test_the_docs_show_dx_commands() -> None:
    # guards the extraction itself: the quick reference and the runbook are full of commands
    assert len(EXAMPLES) > 40
    assert any(e.argv[:2] == ("sink", "run") for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.where} dx {' '.join(e.argv)}")
def test_documented_command_parses(example: Example) -> None:
    errors = _parse_errors(typer.main.get_command(app), "dx", list(example.argv))
    assert not errors, f"{example.where}: `{example.text}`: {'; '.join(errors)}"


def test_task_selections_by_filter_say_all() -> None:
    """``dx tasks retry|skip`` act on ids, or on every task matching filters with ``--all``
    (the CLI refuses filters alone, so a run does not act on more than asked)."""
    wrong = [
        f"{e.where}: `{e.text}`" for e in EXAMPLES
        if e.argv[:2] in (("tasks", "retry"), ("tasks", "skip"))
        and any(a.startswith("-") for a in e.argv[2:]) and "--all" not in e.argv
    ]
    assert not wrong, "filters without --all: " + ", ".join(wrong)


@pytest.mark.parametrize("argv, wanted", [
    (["import", "f.csv", "--route", "R"], "No such option: --route"),
    (["tasks", "retyr", "1"], "no such command 'retyr'"),
    (["sink", "run", "a", "b"], "unexpected extra arguments"),
    (["--verbose", "relay"], "No such option: --verbose"),
])
def test_the_check_catches_drift(argv: list[str], wanted: str) -> None:
    errors = _parse_errors(typer.main.get_command(app), "dx", argv)
    assert any(wanted in e for e in errors), errors


def test_placeholders_and_usage_notation_pass() -> None:
    command = typer.main.get_command(app)
    assert _parse_errors(command, "dx", ["tasks", "retry", "ID"]) == []
    assert _parse_errors(command, "dx", ["snapshot", "TABLE", "--chunk", "N"]) == []
    assert _parse_errors(command, "dx", ["COMMAND", "--help"]) == []


def test_documented_dev_verbs_exist_and_ci_runs_the_quick_start() -> None:
    """`./dev VERB` in the docs is a verb the script handles, and CI runs the quick start's
    test command exactly (the README promises both)."""
    verbs = set(re.findall(r"^  ([a-z|-]+)\)", (REPO / "dev").read_text(), re.M))
    handled = {v for group in verbs for v in group.split("|")}
    documented = {m for name in DOCS for m in re.findall(r"\./dev ([a-z-]+)",
                                                        (REPO / name).read_text())}
    assert documented and documented <= handled, f"unknown ./dev verbs: {documented - handled}"
    quick_start = FENCE.search((REPO / "README.md").read_text())
    assert quick_start is not None
    assert "./dev test" in quick_start.group(2) and "./dev demo" in quick_start.group(2)
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert ci[-1].strip().startswith("./dev test"), ci
