"""Several processes as one job: joining, who writes, barriers, and ending every process when one fails.

Every process runs the same program on its share of one global mesh. They join
through `jax.distributed`: under SLURM (several tasks) JAX reads SLURM's
variables; elsewhere JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID say where process 0 listens and who this is.

Failure. JAX's own reaction to a lost peer is a C++ abort with a stack trace,
after a heartbeat timeout, and an error in one process otherwise leaves the
others waiting in their next collective. So each process runs a watchdog
thread that (1) bumps its own heartbeat key in the coordinator's key-value
store every second and watches the others', and (2) watches a `failed` key
that a failing process sets with its one-line error. Either way every
process prints one line naming the process at fault and exits at once
(status 3), before JAX's longer heartbeat timeout would fire. Process 0
hosts the store, so it leaves last: it waits a few seconds for the others to
acknowledge. The loss of process 0 itself (a SIGKILL, a lost node) takes the
store with it: JAX's client aborts at once, which c2f_jax.runtime.fatal_filter
turns into one line, and a store that stops answering ends the others after
PEER_TIMEOUT. (3) It also ends barrier waits that nothing will end (a peer at
another barrier, or stuck elsewhere): see `barrier`.

Nothing here imports JAX at module level: file-only tools (the merger) use
`writes_here` and `barrier` and stay single-process without paying for it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time

from c2f_jax.runtime import fatal_filter, workdir_lock

# Seconds. A peer whose heartbeat has not moved for PEER_TIMEOUT counts as dead; JAX's own heartbeat
# timeout is set well above it so the watchdog's clean exit comes first.
PEER_TIMEOUT = 30
JAX_HEARTBEAT_TIMEOUT = 120
SHUTDOWN_TIMEOUT = 60
ACK_WAIT = 5
# A barrier waits for the slowest process's work (an export of a 7B model, a long compile);
# a failure ends the wait through the watchdog, not through this timeout.
BARRIER_TIMEOUT = 3 * 3600
# A process waiting at one barrier while a peer waits at another has taken a different code path: nothing
# will ever release them. The watchdog ends the job once that has lasted this long (a peer leaving a barrier
# clears its entry within milliseconds of the others entering the next one).
BARRIER_MISMATCH = 10
# A process waiting at a barrier while a peer is neither there, nor at another barrier, nor in work it declared
# (`working`) is waiting for a peer stuck elsewhere (in a collective the others skipped, in a loop). Every
# process does the same work between barriers but what it declares, so that peer is late by seconds, not by
# this; C2F_BARRIER_STRAY overrides it (seconds).
BARRIER_STRAY = 45
WORKING = "working: "

# Directories, one key per process: its failure, its heartbeat, its acknowledgement, the barrier it waits at.
FAILED_KEY, ALIVE_KEY, ACK_KEY, AT_KEY = "c2f/failed/", "c2f/alive/", "c2f/ack/", "c2f/at/"
EXIT_PEER_FAILED = 3

_state = {"barriers": collections.Counter(), "watchdog": None, "stop": threading.Event(), "working": 0, "work": ""}


def _client():
    """The coordinator's client when this process is part of a multi-process job, else None."""
    if "jax" not in sys.modules:
        return None
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def process_index() -> int:
    return sys.modules["jax"].process_index() if _client() is not None else 0


def process_count() -> int:
    return sys.modules["jax"].process_count() if _client() is not None else 1


def writes_here() -> bool:
    """The rule for every file outside Orbax checkpoints: process 0 writes, the others wait and read."""
    return process_index() == 0


def initialize() -> None:
    """Joins a multi-process job when the environment names one (else does nothing), with our timeouts,
    and starts the watchdog. Call before anything else touches JAX's devices."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        try:
            where = dict(
                coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env["JAX_PROCESS_ID"]),
            )
        except (KeyError, ValueError):
            raise ValueError(
                "JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers too"
            ) from None
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SLURM_STEP_ID") is not None:
        where = {}  # inside `srun` with several tasks: JAX reads SLURM's variables
    else:
        return
    import jax

    # JAX's preemption notifier would swallow SIGTERM (c2f_jax.runtime.preemption handles it) and log its
    # own errors when process 0 is lost.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(
        **where,
        initialization_timeout=int(env.get("C2F_INIT_TIMEOUT", 300)),
        heartbeat_timeout_seconds=JAX_HEARTBEAT_TIMEOUT,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT,
    )
    fatal_filter.start(process_index())
    _state["stop"].clear()
    _state["answered"] = time.monotonic()
    thread = threading.Thread(target=_watch, name="c2f-watchdog", daemon=True)
    thread.start()
    threading.Thread(target=_deadman, name="c2f-deadman", daemon=True).start()
    _state["watchdog"] = thread


def _watch() -> None:
    client, me, n = _client(), process_index(), process_count()
    beats, last_change, mismatch = {}, {}, None
    count = 0
    while not _state["stop"].wait(1.0):
        count += 1
        try:
            client.key_value_set(f"{ALIVE_KEY}{me}", str(count), allow_overwrite=True)
            failed = client.key_value_dir_get(FAILED_KEY)
            alive = dict(client.key_value_dir_get(ALIVE_KEY))
            _state["answered"] = time.monotonic()
        except Exception as e:  # the store lives in process 0: it is gone
            if _state["stop"].is_set():
                return
            _exit_now(f"error: lost the coordinator (process 0): {str(e).splitlines()[0][:200]}")
        if failed:
            _acknowledge_and_exit(client, me, n, f"error: stopping: {failed[0][1]}")
        mismatch = _barrier_wait(client, me, mismatch)
        now = time.monotonic()
        for key, value in alive.items():
            peer = int(key.rsplit("/", 1)[-1])
            if beats.get(peer) != value:
                beats[peer], last_change[peer] = value, now
        for peer in range(n):
            seen = last_change.setdefault(peer, now)  # a peer not yet seen gets the timeout from now
            if peer != me and now - seen > PEER_TIMEOUT:
                message = f"process {peer} stopped responding (no heartbeat for {PEER_TIMEOUT} s)"
                _announce(client, message)
                _acknowledge_and_exit(client, me, n, f"error: stopping: {message}")


def _deadman() -> None:
    """A store that stops answering (process 0 frozen, its node lost without a connection reset) leaves the
    watchdog's calls hanging until JAX's heartbeat timeout: this ends the process after PEER_TIMEOUT."""
    while not _state["stop"].wait(1.0):
        if time.monotonic() - _state["answered"] > PEER_TIMEOUT:
            _exit_now(
                f"error: stopping: lost the coordinator (process 0): its store has not answered for {PEER_TIMEOUT} s"
            )


def _barrier_wait(client, me: int, seen: tuple | None) -> tuple | None:
    """(what, since when) of this process's barrier wait that nothing will end: a peer waits at another
    barrier (limit BARRIER_MISMATCH), or a peer is neither at this barrier nor in declared work (`working`) nor
    at a barrier at all: stuck elsewhere (limit BARRIER_STRAY). Ends the job once that has lasted its limit."""
    try:
        at = {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(AT_KEY)}
    except Exception:
        return None
    mine = at.get(me, "")
    if not mine or mine.startswith(WORKING):
        return None
    others = [(peer, at.get(peer, "")) for peer in range(process_count()) if peer != me]
    other = next(((peer, b) for peer, b in others if b and b != mine and not b.startswith(WORKING)), None)
    stray = [peer for peer, b in others if not b]
    if other is not None:
        what, limit = (
            (
                f"process {me} waits at barrier {mine!r}, process {other[0]} at {other[1]!r}: the processes "
                "took different paths"
            ),
            BARRIER_MISMATCH,
        )
    elif stray:
        names = ", ".join(map(str, stray))
        what, limit = (
            (
                f"process {me} has waited at barrier {mine!r} for {_stray_limit()} s; process{'es' * (len(stray) > 1)} "
                f"{names} neither came nor declared long work: stuck elsewhere"
            ),
            _stray_limit(),
        )
    else:
        return None
    if seen is None or seen[0] != what:
        return what, time.monotonic()
    if time.monotonic() - seen[1] > limit:
        _announce(client, what)
        _acknowledge_and_exit(client, me, process_count(), f"error: stopping: {what}")
    return seen


def _stray_limit() -> float:
    return float(os.environ.get("C2F_BARRIER_STRAY", BARRIER_STRAY))


@contextlib.contextmanager
def working(what: str):
    """Declares long work that only this process does while its peers wait at a barrier (process 0 writing a 7B
    export): they wait for it up to BARRIER_TIMEOUT instead of judging it stuck after BARRIER_STRAY."""
    client = _client()
    _state["working"] += 1
    try:
        if _state["working"] == 1:
            _state["work"] = what
        if client is not None and _state["working"] == 1:
            client.key_value_set(f"{AT_KEY}{process_index()}", f"{WORKING}{what}", allow_overwrite=True)
        yield
    finally:
        _state["working"] -= 1
        if client is not None and _state["working"] == 0:
            client.key_value_set(f"{AT_KEY}{process_index()}", "", allow_overwrite=True)


def _announce(client, message: str) -> None:
    try:
        client.key_value_set(f"{FAILED_KEY}{process_index()}", message, allow_overwrite=True)
    except Exception:  # the store is gone: the others learn of it from JAX
        pass


def _acknowledge_and_exit(client, me: int, n: int, line: str | None, code: int = EXIT_PEER_FAILED) -> None:
    try:
        client.key_value_set(f"{ACK_KEY}{me}", "1", allow_overwrite=True)
        if me == 0:  # the store must outlive the others' last look at it
            deadline = time.monotonic() + ACK_WAIT
            while time.monotonic() < deadline and len(client.key_value_dir_get(ACK_KEY)) < n:
                time.sleep(0.1)
    except Exception:
        pass
    _exit_now(line, code)


def _exit_now(line: str | None, code: int = EXIT_PEER_FAILED) -> None:
    if line:
        print(f"[process {process_index()}] {line}", file=sys.stderr, flush=True)
    workdir_lock.release_all()  # what atexit would have done
    os._exit(code)  # no atexit: JAX's shutdown barrier would wait for the processes that are gone


def peer_failure() -> str | None:
    """The message of a process that has announced its failure, if any (an error here may be its echo)."""
    client = _client()
    try:
        failed = client.key_value_dir_get(FAILED_KEY) if client is not None else []
    except Exception:
        return None
    return failed[0][1] if failed else None


def fail(message: str, code: int) -> None:
    """Ends this process with `message` (one line) and, in a multi-process job, every other one too.

    When another process failed first, this error is most likely its consequence (a collective that lost
    its peer): that process is named instead."""
    client = _client()
    if client is None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(code)
    me, first = process_index(), peer_failure()
    _state["stop"].set()
    if first is not None:
        _acknowledge_and_exit(client, me, process_count(), f"error: stopping: {first}")
    print(f"[process {me}] error: {message}", file=sys.stderr, flush=True)
    _announce(client, f"process {me} failed: {message}")
    _acknowledge_and_exit(client, me, process_count(), None, code)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op for one process). `name` says what is
    awaited; the n-th barrier of a name on one process meets the n-th of that name on the others, so a
    barrier one process skips desynchronises only its own name. The watchdog ends a wait that nothing will
    end: a peer at a different barrier after BARRIER_MISMATCH seconds, a peer stuck elsewhere after
    BARRIER_STRAY; a peer in declared work (`working`) is waited for up to BARRIER_TIMEOUT."""
    client = _client()
    if client is None:
        return
    _state["barriers"][name] += 1
    at = f"{name}#{_state['barriers'][name]}"
    client.key_value_set(f"{AT_KEY}{process_index()}", at, allow_overwrite=True)
    client.wait_at_barrier(f"c2f/barrier/{at}", BARRIER_TIMEOUT * 1000)
    after = f"{WORKING}{_state['work']}" if _state["working"] else ""  # a barrier inside declared work stays in it
    client.key_value_set(f"{AT_KEY}{process_index()}", after, allow_overwrite=True)


def shutdown() -> None:
    """A clean end of a multi-process job: every process has finished; leave together."""
    if _client() is None:
        return
    import jax

    barrier("end")
    _state["stop"].set()
    if _state["watchdog"] is not None:
        _state["watchdog"].join()
    jax.distributed.shutdown()
