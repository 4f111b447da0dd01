"""What every command-line tool shares: one-line errors and a non-zero exit instead of a traceback wall."""

from __future__ import annotations

import sys


class UsageError(ValueError):
    """A bad command-line value."""


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
