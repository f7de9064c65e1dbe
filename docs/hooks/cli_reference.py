"""MkDocs hook: the CLI reference page, generated at build time from ``robustedge.cli.build_parser()``.

A page holding the line ``<!-- cli-reference -->`` gets, in its place, the top-level ``robustedge --help``
and one section per command with that command's ``--help``, exactly as argparse prints it at 80 columns.
Nothing is copied by hand, so the page cannot drift from the parsers.
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"
WIDTH = "80"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every command, in ``robustedge --help``'s order."""
    for action in parser._actions:  # argparse keeps its sub-parsers on this one action
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def cli_reference() -> str:
    from robustedge.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps at the terminal's width: fix it, so every build is the same
    try:
        parser = build_parser()
        lines = ["## `robustedge`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, summary, sub in _subcommands(parser):
            lines += [f"## `robustedge {name}`", ""]
            if summary:
                lines += [summary[0].upper() + summary[1:] + ".", ""]
            lines += ["```text", sub.format_help().rstrip(), "```", ""]
        return "\n".join(lines)
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
