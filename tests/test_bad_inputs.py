"""Every bad input of tests/bad_inputs.py, run through the CLIs: exit 2, one `error:` line, no traceback, nothing
created or changed. The table runs in one process that forks a child per case (the CLIs imported once); the
cases that once ended in a traceback, a native abort or library logging also run as real subprocesses."""

import json
import logging
import os
import subprocess
import sys

import bad_inputs  # noqa: E402  (tests/bad_inputs.py, the table's harness)
import pytest
from conftest import ROOT, SHORT, cli_env

pytestmark = pytest.mark.slow  # the whole bad-input table through the CLIs

# Each once printed a traceback, aborted, or logged above our line.
AS_SUBPROCESS = (
    "train truncated checkpoint file",
    "train garbage .jsonl",
    "train config syntax error",
    "generate --max-new-tokens 1000000000",
    "export --dtype abc",
)


def _run_table(demo, tmp_path_factory, *extra):
    workdir, _ = demo
    folder = tmp_path_factory.mktemp("bad_inputs")
    (folder / "run_args.json").write_text(json.dumps(SHORT))
    out = folder / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "bad_inputs.py"),
            "--fixtures",
            str(folder / "fx"),
            "--run",
            str(workdir),
            "--run-args",
            str(folder / "run_args.json"),
            "--json",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cli_env(),
        timeout=1200,
    )
    print(done.stdout[-5000:])
    assert out.exists(), done.stderr[-3000:]
    return {r["name"]: r for r in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def table(demo, tmp_path_factory):
    return _run_table(demo, tmp_path_factory)


@pytest.mark.parametrize("name", [c.name for c in bad_inputs.CASES])
def test_refused_cleanly(table, name):
    r = table[name]
    assert not r["problem"], f"{r['problem']}: {r['argv']}\n{r['output']}"


def test_as_real_subprocesses(demo, tmp_path_factory):
    only = [arg for name in AS_SUBPROCESS for arg in ("--only", name)]
    results = _run_table(demo, tmp_path_factory, "--subprocess", *only)
    assert sorted(results) == sorted(AS_SUBPROCESS)
    for r in results.values():
        assert not r["problem"], f"{r['name']}: {r['problem']}\n{r['output']}"


def test_tensorstore_echoes_are_dropped_and_nothing_else():
    # A failed save or restore leaves TensorStore futures whose exceptions asyncio logs when they are collected:
    # no traceback, only TensorStore's text (CI once printed 60 such lines under the one-line error), and
    # TensorStore callbacks into Orbax's closed event loop, an unraisable "Event loop is closed" apiece (CI once
    # printed 504 lines of them). Other futures' exceptions, and a closed loop called from Python, must still be
    # reported.
    import logging
    import warnings

    from c2f_jax.runtime import checkpoint

    # the filters this process's Checkpointers installed (for good) set aside: these must be the test's own
    saved = (sys.unraisablehook, {n: logging.getLogger(n).filters for n in checkpoint._LOGGERS}, warnings.filters[:])
    try:
        for name in checkpoint._LOGGERS:
            logging.getLogger(name).filters = []
        unfiltered = _echoes_and_ours(lambda: lambda: None)  # the control: every echo reaches the user
        filtered = _echoes_and_ours(checkpoint.drop_orbax_echoes)
    finally:
        sys.unraisablehook = saved[0]
        for name, filters in saved[1].items():
            logging.getLogger(name).filters = filters
        warnings.filters[:] = saved[2]
    assert len(unfiltered["logged"]) == 3, unfiltered["logged"]
    assert [u.object is None for u in unfiltered["unraisable"]] == [True, False]  # TensorStore's, then ours
    assert len(filtered["logged"]) == 1 and "a bug of ours" in filtered["logged"][0], filtered["logged"]
    assert [u.object is None for u in filtered["unraisable"]] == [False]
    # and importing the module installs nothing
    code = (
        "import logging, sys; hook = sys.unraisablehook; import c2f_jax.runtime.checkpoint; "
        "assert sys.unraisablehook is hook and not logging.getLogger('asyncio').filters"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _echoes_and_ours(install) -> dict:
    """With the filters `install()` puts in place (it returns their remover): two TensorStore future echoes and
    a future exception of ours, logged by asyncio when collected; a TensorStore callback into a closed loop and
    a closed loop called from our `__del__`, both unraisable. Returns what reached the asyncio log and the hook
    under the filters."""
    import asyncio
    import gc
    import threading

    import tensorstore as ts

    reported = []
    sys.unraisablehook = reported.append
    remove = install()
    handler = _Records()
    logging.getLogger("asyncio").addHandler(handler)
    try:
        loop = asyncio.new_event_loop()
        echoes = [
            'OUT_OF_RANGE: Error reading "critic.opt_state.1.0.nu.layers.mlp.up/0.0.0" in OCDBT database '
            'at local file "/w/checkpoints/8/state/": Requested byte range [31936166, 31947619) is not valid '
            "for value of size 15996928",
            'RESOURCE_EXHAUSTED: Error writing "critic.opt_state.1.0.mu.layers.attn.o/0.1.0.0" in OCDBT '
            'database at local file "/w/checkpoints/3.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/": '
            "Failed to write 40960 bytes to file 6: No space left on device",
        ]
        for text in (*echoes, "a bug of ours"):
            future = loop.create_future()
            future.set_exception(ValueError(text))
            del future
            gc.collect()

        promise, pending = ts.Promise.new()  # a TensorStore write or read still in flight when the loop closes
        task = loop.create_task(_awaiting(pending))
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        finisher = threading.Thread(target=lambda: promise.set_result(1))
        finisher.start()
        finisher.join()
        task._log_destroy_pending = False  # it stays pending: the loop it waits on is closed
        del task

        class CallsAClosedLoop:
            def __del__(self):
                loop.call_soon_threadsafe(print)

        CallsAClosedLoop()
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
        remove()
    return {
        "logged": [r.getMessage() + str(r.exc_info[1]) for r in handler.records if r.exc_info],
        "unraisable": reported,
    }


async def _awaiting(future):
    return await future


def test_a_failed_reads_abandoned_coroutines_print_nothing_at_exit():
    """Orbax's failed read can leave read coroutines that were never started, held until exit, where each
    printed 'coroutine ... was never awaited' under the command's one error line once the filter for it was
    dropped (another thread's warnings.catch_warnings restores its own copy). checkpoint closes them at exit."""
    script = """
import sys, warnings
from c2f_jax.runtime import checkpoint

async def _read_array_index_and_device_put():
    pass
held = [_read_array_index_and_device_put() for _ in range(3)]  # what the failed read leaves behind
if sys.argv[1] == "failed read":
    checkpoint._finalise_failed_read(RuntimeError("file cut short"))
warnings.resetwarnings()  # the filter dropped, as a thread's catch_warnings can drop it
"""
    run = lambda how: subprocess.run(
        [sys.executable, "-c", script, how], capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
    )
    control, closed = run("nothing"), run("failed read")
    assert "was never awaited" in control.stderr  # without the close at exit, the warning prints
    assert closed.returncode == 0 and "never awaited" not in closed.stderr, closed.stderr[-2000:]
