"""One job per workdir: a live holder refuses a second job by name; a dead or silent one is taken over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from c2f_jax.runtime import workdir_lock

HOLDER = (
    "import sys, time; from c2f_jax.runtime import workdir_lock; workdir_lock.hold(sys.argv[1]); "
    "print('held', flush=True); time.sleep(300)"
)


@pytest.fixture
def holder(tmp_path):
    """A live process on this host holding tmp_path / 'w'."""
    path = tmp_path / "w"
    path.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    yield path, proc
    proc.kill()
    proc.wait()


def test_a_live_holder_refuses_by_name_and_a_killed_one_is_taken_over(holder, capsys):
    path, proc = holder
    with pytest.raises(workdir_lock.HeldError) as e:
        workdir_lock.hold(path)
    line = str(e.value)
    assert f"in use by another job (host {os.uname().nodename}, process id {proc.pid}, since 20" in line, line
    assert "\n" not in line and path.is_dir()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    workdir_lock.hold(path)
    assert (
        f"taking over the hold of a job that is gone (host {os.uname().nodename}, process id {proc.pid}"
        in capsys.readouterr().err
    )
    assert json.loads((path / workdir_lock.LOCK).read_text())["pid"] == os.getpid()
    workdir_lock.hold(path)  # this process's own hold: no-op
    workdir_lock.release(path)
    assert not (path / workdir_lock.LOCK).exists()


def test_a_hold_from_another_host_is_stale_only_once_it_stops_being_renewed(tmp_path, capsys):
    lock = tmp_path / workdir_lock.LOCK
    lock.write_text(
        json.dumps({"host": "node-17", "pid": 4242, "start_ticks": "1", "since": "2026-12-06 01:02:03 UTC"})
    )
    with pytest.raises(workdir_lock.HeldError, match="host node-17, process id 4242, since 2026-12-06 01:02:03 UTC"):
        workdir_lock.hold(tmp_path)
    old = time.time() - workdir_lock.STALE - 5
    os.utime(lock, (old, old))
    workdir_lock.hold(tmp_path)
    assert (
        "(host node-17, process id 4242, since 2026-12-06 01:02:03 UTC: not renewed for 12" in capsys.readouterr().err
    )
    workdir_lock.release(tmp_path)


def test_a_hold_cut_off_while_written_is_judged_by_its_age(tmp_path):
    lock = tmp_path / workdir_lock.LOCK
    lock.write_text('{"host": "node-')
    with pytest.raises(workdir_lock.HeldError, match=r"host \?, process id \?"):
        workdir_lock.hold(tmp_path)
    old = time.time() - workdir_lock.STALE - 5
    os.utime(lock, (old, old))
    workdir_lock.hold(tmp_path)
    workdir_lock.release(tmp_path)
