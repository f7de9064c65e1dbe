"""The documentation (docs/, mkdocs.yml, README.md) cannot rot: the site builds with ``mkdocs build --strict``
(no broken link, anchor or API reference), and every command block of the pages a newcomer follows is either
run here, as written, or marked as needing what CI does not have.

A block is marked by an HTML comment on the line before its fence (invisible on the site):

    <!-- docs-test: run -->       run by test_the_cpu_blocks_run_as_written (CPU, embedded digits, seconds)
    <!-- docs-test: gpu -->       needs a CUDA GPU
    <!-- docs-test: download -->  needs a download (CIFAR-10, RobustBench weights, a file of yours, an extra)
    <!-- docs-test: long -->      runs on a CPU, but for minutes (the quickstart, full training, servers)

The run blocks of all checked pages run in one temporary folder, in the site's nav order (so a guide can use
the model Getting started trains), in one Python process: ``robustedge ...`` lines through the console
script's own entry point, ``robustedge.cli.main`` (the interpreter and torch start once, not once per
command), ``python ...`` lines as subprocesses, ``python`` blocks with ``exec``; each with a time limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
KINDS = ("run", "gpu", "download", "long")
MARK = re.compile(r"^<!--\s*docs-test:\s*(\S+)\s*-->\s*$")
FENCE = re.compile(r"^(```+)\s*([\w-]*)")
# the design and results pages are records (the commands behind a measurement), not steps to follow
RECORDS = ("design/", "results/")
COMMAND_LINE = re.compile(r"(?m)(^|&&|;|\|)\s*(robustedge\s|torchrun\s.*robustedge|python3?\s+-m\s+robustedge)")
SECONDS_PER_COMMAND = 180  # each block takes seconds alone on a CPU; the limit only catches a hang


def checked_pages() -> list[str]:
    """Pages a newcomer follows, in the site's nav order (mkdocs.yml), then any page the nav forgot."""
    nav = re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?\"?([\w./-]+\.md)\"?\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = [p for p in nav if not p.startswith(RECORDS)]
    rest = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    return pages + [p for p in rest if p not in pages and not p.startswith(RECORDS)]


def blocks(page: str) -> list[dict]:
    """Every fenced block of a page: its language, code, the mark before it (or None) and its line."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(before)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        found.append({"page": page, "line": i + 1, "lang": fence.group(2), "code": "\n".join(lines[i + 1:end]) + "\n",
                      "mark": mark.group(1) if mark else None})
        i = end + 1
    return found


def is_command_block(block: dict) -> bool:
    if block["lang"] == "python":
        return "robustedge" in block["code"]
    return block["lang"] in ("", "bash", "sh", "shell", "console") and bool(COMMAND_LINE.search(block["code"]))


def test_the_site_builds_strictly(tmp_path):
    """No broken link, anchor, image or API reference; the CLI and API pages are generated from the code."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    from robustedge.cli import build_parser  # what the hook documents
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, parser in sub.choices.items():
        assert f"usage: robustedge {name}" in cli, f"the CLI reference lacks `robustedge {name}`"
        assert all(option in cli for action in parser._actions for option in action.option_strings)
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    import robustedge

    for name in robustedge.API:
        assert f'id="robustedge.api.{name}"' in api, f"the API reference lacks robustedge.{name}"


def test_every_command_block_is_run_or_marked():
    unmarked, unknown, dangling = [], [], []
    for page in checked_pages():
        for block in blocks(page):
            where = f"{page}:{block['line']}"
            if block["mark"] is not None and block["mark"] not in KINDS:
                unknown.append(f"{where} ({block['mark']})")
            elif block["mark"] is None and is_command_block(block):
                unmarked.append(where)
        lines = [line.strip() for line in (DOCS / page).read_text(encoding="utf-8").splitlines()]
        for n, line in enumerate(lines):
            if MARK.match(line) and not FENCE.match(next((later for later in lines[n + 1:] if later), "")):
                dangling.append(f"{page}:{n + 1}")
    assert not unmarked, f"command blocks with no <!-- docs-test: {'|'.join(KINDS)} --> mark: {unmarked}"
    assert not unknown, f"unknown marks (valid: {', '.join(KINDS)}): {unknown}"
    assert not dangling, f"marks not followed by a code block: {dangling}"


RUNNER = r'''
import contextlib, io, json, shlex, signal, subprocess, sys, time, traceback

blocks, limit = json.load(open(sys.argv[1])), int(sys.argv[2])


def steps(block):
    if block["lang"] == "python":
        yield "(python block)", None
        return
    for line in block["code"].replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            yield line.strip(), argv


class Timeout(Exception):
    pass


def on_alarm(signum, frame):
    raise Timeout()


signal.signal(signal.SIGALRM, on_alarm)
from robustedge.cli import main as robustedge  # the console script's entry point

for block in blocks:
    for text, argv in steps(block):
        out, start = io.StringIO(), time.time()
        signal.alarm(limit)
        try:
            if argv is None:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    exec(compile(block["code"], block["page"], "exec"), {"__name__": "__docs__"})
                rc = 0
            elif argv[0] == "robustedge":
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    rc = robustedge(argv[1:])
            elif argv[0] in ("python", "python3"):
                proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=limit)
                out.write(proc.stdout + proc.stderr)
                rc = proc.returncode
            else:
                rc = "not a robustedge or python command: a run block may hold only those"
        except Timeout:
            rc = f"over {limit} s"
        except BaseException:
            out.write(traceback.format_exc())
            rc = "exception"
        finally:
            signal.alarm(0)
        print(f"{time.time() - start:6.1f} s  {block['page']}:{block['line']}  {text}", flush=True)
        if rc != 0:
            print(f"FAILED ({rc}):\n{out.getvalue()[-6000:]}", flush=True)
            sys.exit(1)
'''


def test_the_cpu_blocks_run_as_written(tmp_path):
    """Every run block of the checked pages, in nav order, in one fresh folder (models, bundles and reports
    land there, as they would in the reader's)."""
    run = [b for page in checked_pages() for b in blocks(page) if b["mark"] == "run"]
    assert run
    (tmp_path / "blocks.json").write_text(json.dumps(run))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTEDGE_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json"), str(SECONDS_PER_COMMAND)],
                          cwd=work, capture_output=True, text=True, timeout=900, env=env)
    print(proc.stdout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme) <= 8000, f"README.md has {len(readme)} characters: move detail to docs/"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_the_two_setup_commands_are_the_ones_ci_runs(page):
    """README command 2 is what .ci/run runs, verbatim; Getting started repeats both commands."""
    text = (ROOT / page).read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in text
    assert "pip install -e . && robustedge quickstart" in text
