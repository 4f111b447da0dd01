"""What every command-line tool shares: one-line errors and a non-zero exit instead of a traceback wall."""

from __future__ import annotations

import sys


class UsageError(ValueError):
    """A bad command-line value."""


def add_sampling_args(parser, temperature: float) -> None:
    """The sampling flags every generating tool takes (tools/generate.py, evaluate.py, sweep.py)."""
    parser.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--suppress-eos", action="store_true",
                        help="never sample EOS/stop tokens (the Coarse Actor's training mode)")
    parser.add_argument("--system-prompt", default=None, help="text placed before each dialogue; 'coarse' = the paper's")


def run(main) -> None:
    """Calls main(); our ValueErrors and missing files become 'error: ...' on stderr and exit status 2."""
    try:
        code = main()
    except (ValueError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
