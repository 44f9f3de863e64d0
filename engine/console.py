"""The ``modulora`` console script: what can be checked before the command line imports torch and transformers
(seconds) is checked first, so a model id the hub cannot give fails at once; then :func:`engine.cli.main`."""

from __future__ import annotations

import sys

from engine.errors import EngineError
from engine.hub import check_hub_id

MODEL_COMMANDS = ("quantize", "calibrate", "eval", "finetune", "correct")  # MODEL is their first argument


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) >= 2 and args[0] in MODEL_COMMANDS and not args[1].startswith("-"):
        try:
            check_hub_id(args[1])
        except EngineError as exc:
            print(f"modulora: error: {exc}", file=sys.stderr)
            sys.exit(2)
    from engine.cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":
    main()
