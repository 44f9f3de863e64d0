"""What the finetuning benchmarks share: the shared model and data, running the ``modulora`` CLI, tables, docs.

Every figure comes from the command line a user would type, run in a subprocess;
the commands are recorded so each document says how its numbers were made.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
sys.path.insert(0, str(REPO))

from engine.paths import shared_dir  # noqa: E402

SHARED = shared_dir()
GGUF = SHARED / "models" / "stories260K.gguf"
TRAIN_TXT = SHARED / "data" / "tinystories" / "train.txt"
VALID_TXT = SHARED / "data" / "tinystories" / "valid.txt"
SHAKESPEARE_TXT = SHARED / "data" / "tinyshakespeare" / "input.txt"
SST2_TRAIN = SHARED / "data" / "sst2" / "train.tsv"
SST2_DEV = SHARED / "data" / "sst2" / "dev.tsv"
SST2_LABELS = ("--format", "classification", "--label-word", "0=negative", "--label-word", "1=positive")


class Cli:
    """Runs ``modulora`` subcommands and keeps the command lines (with ``$WORK`` for the scratch directory)."""

    def __init__(self, work: Path, threads: int) -> None:
        self.work, self.threads = work, threads
        self.commands: list[str] = []

    def shown(self, args: Sequence[Any]) -> str:
        text = shlex.join(["modulora", *map(str, args)])
        return text.replace(str(self.work), "$WORK").replace(str(SHARED), "$SHARED")

    def run(self, *args: Any) -> tuple[str, float]:
        """stdout and wall seconds of one command; a failure stops the benchmark with its stderr."""
        command = self.shown(args)
        self.commands.append(command)
        print(f"$ {command}", file=sys.stderr, flush=True)
        env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(self.threads)}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=REPO, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"command failed ({done.returncode}): {command}\n{done.stderr[-3000:]}")
        return done.stdout, seconds

    def evaluate(self, model: Any, data: Path, *extra: Any) -> dict[str, Any]:
        """``modulora eval MODEL --data DATA --json``, parsed."""
        out, _ = self.run("eval", model, "--data", data, "--json", *extra)
        return json.loads(out.strip().splitlines()[-1])


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=None,
                        help="Keep the models and runs here (default: a temporary directory, removed at the end).")
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads per command (1: on a tiny model, more threads mostly wait on each other).")


@contextmanager
def work_dir(given: Path | None, name: str) -> Iterator[Path]:
    """``--work`` if given (kept), else a temporary directory removed at the end, also on failure."""
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix=f"modulora-{name}-") as tmp:
        yield Path(tmp)


def gap_closed(before: float, after: float, reference: float) -> float:
    """Share of the log-perplexity gap to ``reference`` that going from ``before`` to ``after`` closes."""
    return (math.log(before) - math.log(after)) / (math.log(before) - math.log(reference))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_doc(name: str, title: str, script: str, body: str, commands: Sequence[str]) -> Path:
    """``docs/NAME.md``: title, how to rerun, the body, then every command that made the figures."""
    DOCS.mkdir(exist_ok=True)
    argv = sys.argv[1:]
    if "--work" in argv:  # where the scratch files went does not change the figures
        del argv[argv.index("--work") : argv.index("--work") + 2]
    listing = "\n".join(commands)
    text = (f"# {title}\n\n`{shlex.join(['python', f'bench/{script}', *argv])}` (shared files under `$SHARED`, "
            f"default `../shared`)\n\n{body}\n\n## Commands\n\n```\n{listing}\n```\n")
    path = DOCS / f"{name}.md"
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)
    return path
