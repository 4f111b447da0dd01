"""What every command-line tool shares: one-line errors and a non-zero exit instead of a traceback wall."""

from __future__ import annotations

import sys
import traceback

from c2f_jax.runtime import distributed, metrics


class UsageError(ValueError):
    """A bad command-line value."""


def add_sampling_args(parser, temperature: float) -> None:
    """The sampling flags every generating tool takes (c2f-generate, evaluate.py, sweep.py)."""
    parser.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument(
        "--suppress-eos", action="store_true", help="never sample EOS/stop tokens (the Coarse Actor's training mode)"
    )
    parser.add_argument(
        "--system-prompt", default=None, help="text placed before each dialogue; 'coarse' = the paper's"
    )


def add_overwrite_arg(parser) -> None:
    """--overwrite: the only way a command replaces an existing output (c2f_jax.runtime.workdir.check_output)."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (never a workdir)")


def positive_ints(value: str, flag: str) -> list[int]:
    """A comma-separated list of positive integers (bucket sizes)."""
    try:
        numbers = [int(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise UsageError(f"{flag}={value!r} must be comma-separated integers >= 1")
    return numbers


def one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def run(main) -> None:
    """Calls main() inside a (possibly multi-process) job and exits with its status.

    Our ValueErrors and missing files become one line on stderr and exit status 2 instead of a
    traceback wall; anything else keeps its traceback (a bug), then exit status 1. With several
    processes, either also ends every other process promptly (c2f_jax.runtime.distributed).
    """
    try:
        distributed.initialize()
        code = main()
    except (ValueError, OSError) as e:
        metrics.close_progress_bars()
        distributed.fail(one_line(e), 2)
    except KeyboardInterrupt:
        distributed.fail("interrupted", 130)
    except SystemExit as e:  # argparse's usage errors: the message is printed already
        if e.code in (0, None) or distributed.process_count() == 1:
            raise
        distributed.fail(f"exit status {e.code}", e.code if isinstance(e.code, int) else 2)
    except BaseException as e:
        metrics.close_progress_bars()
        if distributed.peer_failure() is None:  # a bug here, not the echo of another process's failure
            traceback.print_exc()
        distributed.fail(f"{type(e).__name__}: {one_line(e)}", 1)
    distributed.shutdown()
    sys.exit(code or 0)
