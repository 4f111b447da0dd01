"""`python tools/merge.py ...` is `c2f-merge ...`: the Knowledge Residue Merger and mergekit recipes
(c2f_jax.cli.merge; `--help` lists the flags)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout runs without installing

from c2f_jax.cli.merge import command  # noqa: E402

if __name__ == "__main__":
    command()
