"""Run a recipe as a script, for Ray's job and cluster tools::

    ray job submit --working-dir . -- python recipes/run.py recipes/quickstart.yaml
    ray submit cluster/local.yaml recipes/run.py -- recipes/quickstart.yaml

Same arguments and exit codes as ``modulora run``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, when run from a plain checkout

from engine.cli import cli, main  # noqa: E402
from recipes.cli import run_command  # noqa: E402

if __name__ == "__main__":
    cli.add_command(run_command, "run")
    main(["run", *sys.argv[1:]])
