"""What the docs show works: every shell command and Python snippet of ``README.md`` and ``docs/*.md`` runs.

The fenced blocks are the contract. A ``bash`` block runs in ``bash -e``, a ``python`` block in a fresh interpreter,
in document order (README first, then ``docs/*.md`` sorted), all in one temporary copy of the repository, so later
blocks use what earlier ones made (the README trains ``runs/tiny-cpu``, exports ``hf/tiny-cpu``, ...). A block is
left out only with a marker on the line before its fence, visible in the document source::

    <!-- snippet: skip (why: a GPU, the network, a run of many minutes, ...) -->

Other fences must say what they hold (``text``, ``json``, ``yaml``): a command block without a language cannot slip
through unrun. The blocks' text runs as written; to keep the suite short, ``python`` on the blocks' PATH is a thin
wrapper that appends these overrides to the project's entry points (later ``--key value`` wins):

* ``train.py`` (directly or through ``deepy.py``): ``--train-iters 2 --eval-iters 1``,
* ``generate.py``: ``--maximum_tokens 4``,
* ``eval.py``: ``--eval_limit 2``.

Every block must exit 0 without a traceback or the DeepSpeed / lm_eval start-up noise users complained about, and
afterwards ``git status`` of the copy must list no file: everything the documented commands write is git-ignored.
The slow test prints how many blocks ran and how many were left out, and why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_LANGUAGES = ("bash", "python")
DATA_LANGUAGES = ("text", "json", "yaml")
SKIP_MARKER = re.compile(r"^<!--\s*snippet:\s*skip\s*\((?P<why>[^)]+)\)\s*-->$")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
#: what the wrapper appends per entry point (see the module docstring)
SHORTER_RUNS = {"train.py": ["--train-iters", "2", "--eval-iters", "1"], "generate.py": ["--maximum_tokens", "4"],
                "eval.py": ["--eval_limit", "2"]}
#: start-up lines nobody should have to read past (issue 20, item 4)
NOISE = ("Traceback (most recent call last)", "Setting accelerator to CPU", "built successfully",
         "is defined, but aggregation is not", "is defined, but higher_is_better is not")
BLOCK_TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    document: Path
    line: int           # 1-based line of the opening fence
    language: str
    text: str
    skip: str | None    # the marker's reason, None = runs

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"


def fenced_blocks(document: Path) -> list[Block]:
    """The fenced code blocks of one Markdown file, with the skip marker of each (if any)."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{document.relative_to(REPO)}:{i + 1}: a fence that is never closed"
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP_MARKER.match(previous)
        blocks.append(Block(document, start + 1, match["lang"], "\n".join(lines[start + 1:end]) + "\n",
                            marker["why"].strip() if marker else None))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in fenced_blocks(document)]


def test_every_fence_says_what_it_holds_and_every_skip_says_why():
    """Fast structural check: commands are bash / python blocks, the rest are labelled data, markers only in front
    of code and each with a reason; a marker that is not right before a fence is a typo."""
    problems = []
    for block in all_blocks():
        if block.language not in RUN_LANGUAGES + DATA_LANGUAGES:
            problems.append(f"{block.where}: fence language {block.language!r}; use one of "
                            f"{', '.join(RUN_LANGUAGES + DATA_LANGUAGES)}")
        if block.skip is not None and block.language not in RUN_LANGUAGES:
            problems.append(f"{block.where}: skip marker before a {block.language!r} block (only code runs)")
    for document in DOCUMENTS:
        lines = document.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if "snippet:" in line and line.lstrip().startswith("<!--"):
                following = next((l for l in lines[n + 1:] if l.strip()), "")
                if not SKIP_MARKER.match(line.strip()) or not FENCE.match(following):
                    problems.append(f"{document.relative_to(REPO)}:{n + 1}: malformed or misplaced marker {line!r}")
    assert not problems, "\n".join(problems)
    runnable = [b for b in all_blocks() if b.language in RUN_LANGUAGES]
    assert any(b.skip is None for b in runnable) and any(b.document.name == "README.md" for b in runnable)


# ------------------------------------------------------------------------------------------------ the slow run
WRAPPER = '''#!{python}
"""`python` for the documentation snippets: the real interpreter, with shorter runs for the project's entry points."""
import os
import sys

SHORTER = {shorter!r}
args = sys.argv[1:]
scripts = [os.path.basename(a) for a in args if a.endswith(".py")]
script = scripts[1] if scripts[:1] == ["deepy.py"] and len(scripts) > 1 else (scripts[0] if scripts else None)
if script in SHORTER and "-m" not in args[:1]:
    args = args + SHORTER[script]
os.execv({python!r}, [{python!r}] + args)
'''


def _copy_repository(dest: Path) -> None:
    """The checkout's files as a fresh clone would have them (tracked files and new ones not ignored, as they are in
    the working tree), in a git repository of its own (so that ``git status`` can tell what the commands wrote)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=snippets", "-c", "user.email=snippets@localhost"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "copy"], cwd=dest, check=True)


def _environment(copy: Path, bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(copy), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(block: Block, copy: Path, env: dict[str, str], scratch: Path) -> subprocess.CompletedProcess:
    if block.language == "bash":
        command = ["bash", "-e", "-o", "pipefail", "-c", block.text]
    else:
        script = scratch / f"snippet_{block.document.stem}_{block.line}.py"
        script.write_text(block.text, encoding="utf-8")
        command = [sys.executable, str(script)]
    return subprocess.run(command, cwd=copy, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


@pytest.mark.slow
def test_every_readme_and_docs_snippet_runs(tmp_path):
    copy, bin_dir, scratch = tmp_path / "repo", tmp_path / "bin", tmp_path / "snippets"
    for folder in (copy, bin_dir, scratch):
        folder.mkdir()
    _copy_repository(copy)
    wrapper = bin_dir / "python"
    wrapper.write_text(WRAPPER.format(python=sys.executable, shorter=SHORTER_RUNS), encoding="utf-8")
    wrapper.chmod(0o755)
    env = _environment(copy, bin_dir)

    code = [b for b in all_blocks() if b.language in RUN_LANGUAGES]
    ran, skipped, timings = [], [b for b in code if b.skip is not None], []
    for block in code:
        if block.skip is not None:
            continue
        start = time.perf_counter()
        proc = _run(block, copy, env, scratch)
        timings.append((block.where, time.perf_counter() - start))
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, (f"{block.where} ({block.language}) exited {proc.returncode}:\n{block.text}\n"
                                      f"--- output (last 4000 characters) ---\n{output[-4000:]}")
        noisy = [line for line in output.splitlines() if any(n in line for n in NOISE)]
        assert not noisy, f"{block.where}: output users have to read past:\n" + "\n".join(noisy[:10])
        ran.append(block)

    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=copy,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert not status, "the documented commands left files git does not ignore (add them to .gitignore):\n" + \
        "\n".join(status[:20])

    report = [f"docs snippets: {len(ran)} ran, {len(skipped)} left out by a marker"]
    report += [f"  ran  {where} ({seconds:.1f} s)" for where, seconds in timings]
    report += [f"  skip {b.where}: {b.skip}" for b in skipped]
    print("\n".join(report))
