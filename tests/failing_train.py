"""`python tests/failing_train.py STEP ARGS...`: the training command, except that process 1 raises a
RuntimeError in its STEP-th Continuous Maximization update (a stand-in for any exception mid-run)."""

import os
import sys

from c2f_jax import train
from c2f_jax.rl import cm
from c2f_jax.runtime import cli

FAIL_AT = int(sys.argv.pop(1))
_update, _calls = cm.update, []


def update_that_fails(*args, **kwargs):
    _calls.append(1)
    if os.environ.get("JAX_PROCESS_ID") == "1" and len(_calls) == FAIL_AT:
        raise RuntimeError(f"injected failure in step {FAIL_AT}")
    return _update(*args, **kwargs)


cm.update = update_that_fails
cli.run(train.main)
