"""The jobs as several processes joined by jax.distributed (fake CPU devices, gloo collectives), against one process.

Every run goes through c2f_jax.runtime.local_job, which kills whatever is left of a job when a test ends.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHORT, TIMING_KEYS, cli_env, comparable

from c2f_jax import train
from c2f_jax.jobs import coarse
from c2f_jax.model import export
from c2f_jax.runtime import checkpoint, distributed, metrics, preemption
from c2f_jax.runtime import workdir as c2f_workdir
from c2f_jax.runtime.local_job import LocalJob

pytestmark = pytest.mark.slow  # several processes and a local SLURM

TRAIN = [sys.executable, "-m", "c2f_jax.train", "--config", "tiny_coarse.py", *SHORT]
STEPS = ["--config.steps=3"]
NO_CPP_TRACES = ("Check failure stack trace", "*** SIG", "terminate called")


def run_job(command, processes, devices, timeout=600):
    with LocalJob(command, devices, processes, env=cli_env(), cwd=ROOT) as job:
        return job.wait(timeout)


def assert_all_succeeded(exits):
    for e in exits:
        assert e.returncode == 0, f"process {e.index} exited {e.returncode}:\n{e.log[-3000:]}"


def worst_relative(a: dict, b: dict, floor=1e-6) -> tuple[float, str]:
    """Largest |a-b| / max(|a|, |b|, floor) over the numeric entries both rows hold."""
    keys = [k for k in a if not k.startswith(TIMING_KEYS) and isinstance(a[k], (int, float)) and k in b]
    return max((abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), floor), k) for k in keys)


def weights_relative(path_a, path_b, step) -> float:
    """Largest per-tensor ||a-b|| / ||a|| (Frobenius, as the sharding tests) between two workdirs' trained
    models at `step`."""
    _, a, _ = export.load_model(path_a, step)
    _, b, _ = export.load_model(path_b, step)
    import jax

    return max(
        float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def models_of(path):
    return [path / c2f_workdir.BASE_MODEL, path / c2f_workdir.REWARD_MODEL]


@pytest.fixture(scope="module")
def demo_2x4(tmp_path_factory):
    """The demo, inline base and reward model included, as 2 processes x 4 devices on the 2x2x2 mesh."""
    path = tmp_path_factory.mktemp("mp") / "demo_2x4"
    exits = run_job([*TRAIN, *STEPS, "--workdir", path], 2, 4)
    assert_all_succeeded(exits)
    return path, exits


def folder_relative(a, b) -> float:
    """Largest per-tensor max|a-b| / max|a| between two HF folders."""
    import jax

    from c2f_jax.model import hf

    (_, pa), (_, pb) = hf.load_pretrained(a), hf.load_pretrained(b)
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max() / np.abs(np.asarray(x)).max())
        for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True)
    )


def test_demo_as_2_processes_matches_1_process_on_the_same_mesh(demo, demo_2x4):
    """The whole demo, inline base and reward model included. Process 0 trains the base on one of its
    devices (4 here, 8 in one process: XLA:CPU splits the matmuls differently, 5e-7 apart after 30 steps)
    and the reward job is sharded over both processes (1e-5 apart after 20 steps). A sampled rollout is not
    continuous in the weights, so from there on the runs are alike, not equal: the next test starts both
    topologies from the same models and gets equality to 1e-5."""
    one, rows = demo
    two, exits = demo_2x4
    logged = metrics.read_metrics(two)
    assert [r["step"] for r in logged] == [1, 2, 3]
    base, rm = (folder_relative(a, b) for a, b in zip(models_of(one), models_of(two)))
    print(f"inline base {base:.2e}, reward model {rm:.2e}; first step {worst_relative(logged[0], rows[0])}")
    assert base < 1e-5 and rm < 1e-4
    assert abs(logged[0]["reward/mean"] - rows[0]["reward/mean"]) < 1e-2
    # Process 0 made the inline models, once, and nothing was left half-written.
    assert all((m / "config.json").exists() for m in models_of(two))
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]
    assert all("error" not in e.log.lower() for e in exits)


@pytest.mark.parametrize("processes, devices", [(2, 4), (4, 2)])
def test_ppo_as_several_processes_equals_1_process(demo, tmp_path, processes, devices):
    """From the same base and reward model; 4 x 2 is one task per pair of devices, as a job with one task
    per GPU runs. After the first iteration metrics and the actor agree to 1e-5."""
    one, rows = demo
    base, rm = models_of(one)
    path = tmp_path / "ppo"
    exits = run_job(
        [
            *TRAIN,
            "--config.steps=1",
            f"--config.model.base={base}",
            f"--config.reward_model.path={rm}",
            "--workdir",
            path,
        ],
        processes,
        devices,
    )
    assert_all_succeeded(exits)
    metric, weights = worst_relative(metrics.read_metrics(path)[0], rows[0]), weights_relative(one, path, step=1)
    print(f"{processes}x{devices} against 1x8 after one iteration: metrics {metric}, weights {weights:.2e}")
    assert metric[0] < 1e-5 and weights < 1e-5


def _tool(name):
    return [sys.executable, "-m", f"c2f_jax.cli.{name}"]


def test_export_evaluate_and_sweep_run_as_2_processes(demo_2x4, tmp_path):
    two, _ = demo_2x4
    exits = run_job([*_tool("export"), "--checkpoint", two, "--out", tmp_path / "hf", "--dtype", "float32"], 2, 1)
    assert_all_succeeded(exits)
    assert sum("wrote" in e.log for e in exits) == 1  # process 0 reports and writes
    reference = export.export(two, tmp_path / "hf_one", dtype="float32")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()

    few = ["--limit", "4", "--max-new-tokens", "8", "--batch-size", "4", "--preferences", "none"]
    rm = two / c2f_workdir.REWARD_MODEL
    evaluate = [*_tool("evaluate"), "--model", two, "--reward-model", rm, *few]
    assert_all_succeeded(run_job([*evaluate, "--json", tmp_path / "eval_2.json"], 2, 1))
    assert_all_succeeded(run_job([*evaluate, "--json", tmp_path / "eval_1.json"], 1, 1))
    two_procs = json.loads((tmp_path / "eval_2.json").read_text())[str(two)]
    assert two_procs == json.loads((tmp_path / "eval_1.json").read_text())[str(two)]

    out = tmp_path / "sweep"
    exits = run_job(
        [
            *_tool("sweep"),
            "--coarse",
            two,
            "--sft",
            two / c2f_workdir.BASE_MODEL,
            "--gammas",
            "0.5",
            "--reward-model",
            rm,
            "--out",
            out,
            *few,
        ],
        2,
        1,
    )
    assert_all_succeeded(exits)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["gamma"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[-1]["metrics"] == pytest.approx(two_procs, rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_1.json", "eval_2.json", "hf", "hf_one", "sweep"]


def _lines_naming(log: str, what: str) -> list[str]:
    return [line for line in log.splitlines() if what in line]


def test_an_exception_in_one_process_ends_every_process_promptly(demo, tmp_path):
    base, rm = models_of(demo[0])
    command = [
        sys.executable,
        str(ROOT / "tests" / "failing_train.py"),
        "2",
        "--config",
        "tiny_coarse.py",
        *SHORT,
        *STEPS,
        f"--config.model.base={base}",
        f"--config.reward_model.path={rm}",
        "--workdir",
        tmp_path / "w",
    ]
    survivor, failing = run_job(command, 2, 4, timeout=400)
    assert failing.returncode == 1, failing.log[-2000:]
    assert failing.log.strip().splitlines()[-1] == "[process 1] error: RuntimeError: injected failure in step 2"
    print(f"exception: the survivor exited {survivor.seconds - failing.seconds:.1f} s after the failing process")
    assert survivor.returncode == 3 and survivor.seconds - failing.seconds < 60, (survivor, failing.seconds)
    named = _lines_naming(survivor.log, "process 1")  # a progress bar may share the line (tqdm's \r)
    assert len(named) == 1 and named[0].endswith(
        "[process 0] error: stopping: process 1 failed: RuntimeError: injected failure in step 2"
    ), named
    for e in (survivor, failing):
        assert not any(trace in e.log for trace in NO_CPP_TRACES), e.log[-3000:]


def test_processes_at_different_barriers_end_in_seconds_naming_both(tmp_path):
    """A process that skipped a barrier would leave the others waiting BARRIER_TIMEOUT (3 hours): the watchdog
    sees each waiting at another barrier and ends the job."""
    code = (
        "import sys; from c2f_jax.runtime import cli, distributed\n"
        "def main():\n"
        "    distributed.barrier('start')\n"
        "    distributed.barrier('export' if distributed.process_index() == 0 else 'checkpoint')\n"
        "cli.run(main)\n"
    )
    with LocalJob(
        [sys.executable, "-c", code], devices=1, processes=2, cwd=ROOT, env=cli_env(), log_dir=tmp_path / "logs"
    ) as job:
        exits = job.wait(timeout=120)
    for e in exits:
        assert e.returncode == distributed.EXIT_PEER_FAILED, e.log[-2000:]
        assert e.seconds < distributed.BARRIER_MISMATCH + 40, e.seconds
        assert (
            "waits at barrier 'export#1', process 1 at 'checkpoint#1'" in e.log
            or "waits at barrier 'checkpoint#1', process 0 at 'export#1'" in e.log
        ), e.log[-2000:]
        assert not any(trace in e.log for trace in NO_CPP_TRACES), e.log[-3000:]


STRAY_AFTER_WORK = """import time
from c2f_jax.runtime import cli, distributed
def main():
    distributed.barrier("start")
    me = distributed.process_index()
    if me == 0:
        with distributed.working("a 7B export"):  # longer than the stray limit: declared, so waited for
            time.sleep(12)
    distributed.barrier("exported")
    print("passed the declared wait", flush=True)
    if me == 2:
        time.sleep(300)  # stuck elsewhere
    distributed.barrier("end of step")
cli.run(main)
"""


def test_a_declared_long_wait_completes_and_a_peer_stuck_elsewhere_ends_the_job(tmp_path):
    """Process 0 works alone (declared) for longer than the stray limit: the others wait. Then process 2 stays
    away from a barrier the others wait at, alive: every process ends, naming the barrier and process 2."""
    stray = 6
    with LocalJob(
        [sys.executable, "-c", STRAY_AFTER_WORK],
        devices=1,
        processes=3,
        cwd=ROOT,
        env={**cli_env(), "C2F_BARRIER_STRAY": str(stray)},
        log_dir=tmp_path / "logs",
    ) as job:
        exits = job.wait(timeout=120)
    for e in exits:
        print(f"stuck peer: process {e.index} exited {e.returncode} after {e.seconds:.1f} s")
        assert "passed the declared wait" in e.log and e.returncode == distributed.EXIT_PEER_FAILED, e.log[-2000:]
        assert not any(trace in e.log for trace in NO_CPP_TRACES), e.log[-3000:]
    for e in exits:  # each names the barrier and the stuck process, as the first waiter to judge saw it
        lines = [line for line in e.log.splitlines() if "error" in line]
        assert len(lines) == 1 and re.fullmatch(
            rf"\[process {e.index}\] error: stopping: process [01] has waited at barrier 'end of step#1' for "
            rf"{stray}.0 s; process 2 neither came nor declared long work: stuck elsewhere",
            lines[0],
        ), e.log[-2000:]
    assert max(e.seconds for e in exits) - min(e.seconds for e in exits) < 15


LOSE_PROCESS_0 = """import os, sys, time
import numpy as np
from c2f_jax.runtime import cli, distributed

def main():
    distributed.barrier("start")
    me = distributed.process_index()
    if me == 0:
        time.sleep(2)
        print("lost at", time.monotonic(), flush=True)
        os.kill(os.getpid(), int(sys.argv[1]))
    elif me == 1:
        distributed.barrier("after")
    elif me == 2:
        from jax.experimental import multihost_utils
        multihost_utils.process_allgather(np.int32(me))
    else:
        time.sleep(300)
cli.run(main)
"""


@pytest.mark.parametrize("sig, within", [(signal.SIGKILL, 10), (signal.SIGSTOP, distributed.PEER_TIMEOUT + 15)])
def test_the_loss_of_process_0_ends_the_others_with_one_line_each(tmp_path, sig, within):
    """Process 0 hosts the coordinator. Killed, its peers' JAX clients would abort with a C++ stack trace;
    frozen (a node lost without a connection reset), they would wait for JAX's 120 s heartbeat timeout. The
    others wait at a barrier, in a collective and in their own work: each ends with one line."""
    with LocalJob(
        [sys.executable, "-c", LOSE_PROCESS_0, str(int(sig))],
        devices=1,
        processes=4,
        cwd=ROOT,
        env=cli_env(),
        log_dir=tmp_path / "logs",
    ) as job:
        deadline = time.monotonic() + within + 60
        while time.monotonic() < deadline and not all(job.procs[i].poll() is not None for i in (1, 2, 3)):
            time.sleep(0.1)
        exits = job.wait(0)  # a frozen process 0 is killed here
    lost_at = float(exits[0].log.split("lost at", 1)[1].split()[0])
    for e in exits[1:]:
        after = job.started + e.seconds - lost_at
        print(f"process 0 lost ({sig.name}): process {e.index} exited {e.returncode}, {after:.1f} s later")
        assert e.returncode not in (0, None) and after < within, (e.returncode, after)
        lines = [line for line in e.log.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(
            f"[process {e.index}] error: stopping: lost the coordinator (process 0)"
        ), e.log[-3000:]


def test_a_bad_input_in_one_process_ends_every_process_promptly(demo, tmp_path):
    base, rm = models_of(demo[0])
    command = [*TRAIN, f"--config.model.base={base}", f"--config.reward_model.path={rm}", "--workdir", tmp_path / "w"]
    bad = [*command, "--config.data.source=/nowhere/pairs.jsonl"]
    with LocalJob([command, bad], 4, env=cli_env(), cwd=ROOT) as job:
        survivor, failing = job.wait(300)
    assert failing.returncode == 2 and survivor.returncode == 3, (survivor, failing)
    assert _lines_naming(failing.log, "error") == ["[process 1] error: /nowhere/pairs.jsonl: dataset file not found"], (
        failing.log[-2000:]
    )
    print(f"bad input: the survivor exited {survivor.seconds - failing.seconds:.1f} s after the failing process")
    assert survivor.seconds - failing.seconds < 60
    assert len(_lines_naming(survivor.log, "process 1 failed")) == 1


def test_sigkill_then_relaunch_resumes_to_the_unbroken_run(demo_2x4, tmp_path):
    two, _ = demo_2x4
    base, rm = models_of(two)
    path = tmp_path / "killed"
    command = [*TRAIN, *STEPS, f"--config.model.base={base}", f"--config.reward_model.path={rm}", "--workdir", path]
    with LocalJob(command, 4, 2, env=cli_env(), cwd=ROOT) as job:
        deadline = time.monotonic() + 300
        while not (path / "checkpoints" / "1").exists() and time.monotonic() < deadline and not job.poll():
            time.sleep(0.1)
        assert (path / "checkpoints" / "1").exists() and not job.poll()
        job.kill(1)
        killed_at = time.monotonic() - job.started
        survivor, _ = job.wait(200)
    print(f"SIGKILL: the survivor exited {survivor.seconds - killed_at:.1f} s after the kill")
    assert survivor.returncode not in (0, None) and survivor.seconds - killed_at < 120, survivor
    assert len(metrics.read_metrics(path)) < 3
    assert_all_succeeded(run_job(command, 2, 4))
    assert comparable(metrics.read_metrics(path)) == comparable(metrics.read_metrics(two))
    assert weights_relative(two, path, step=3) == 0.0


def test_sigterm_to_every_process_saves_the_current_step_and_resumes_exactly(demo_2x4, tmp_path):
    """A Kubernetes eviction or a SLURM time limit: SIGTERM to every process. They stop at one step, save it
    (no periodic checkpoint is due), exit EXIT_RESUMABLE, and the relaunch ends as the unbroken run."""
    two, _ = demo_2x4
    base, rm = models_of(two)
    path = tmp_path / "evicted"
    command = [
        *TRAIN,
        *STEPS,
        "--config.checkpoint_every=100",
        f"--config.model.base={base}",
        f"--config.reward_model.path={rm}",
        "--workdir",
        path,
    ]
    with LocalJob(command, 4, 2, env=cli_env(), cwd=ROOT) as job:
        deadline = time.monotonic() + 300
        while not metrics.read_metrics(path) and time.monotonic() < deadline and not job.poll():
            time.sleep(0.05)
        for i in range(2):
            job.kill(i, signal.SIGTERM)
        signalled = time.monotonic() - job.started
        exits = job.wait(200)
    logged = len(metrics.read_metrics(path))
    print(
        f"SIGTERM to both processes: step {logged} saved, exits {[round(e.seconds - signalled, 1) for e in exits]} "
        "s after the signal"
    )
    for e in exits:
        assert e.returncode == preemption.EXIT_RESUMABLE, e.log[-3000:]
    assert 1 <= logged < 3 and checkpoint.step_dirs(path).keys() == {logged}, (logged, checkpoint.step_dirs(path))
    assert_all_succeeded(run_job(command, 2, 4))
    assert comparable(metrics.read_metrics(path)) == comparable(metrics.read_metrics(two))
    assert weights_relative(two, path, step=3) == 0.0


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 1, 1)])
def test_a_checkpoint_from_2_processes_restores_in_1_process_and_trains_on(demo_2x4, tmp_path, mesh):
    two, _ = demo_2x4
    path = tmp_path / "resumed"
    shutil.copytree(two, path)
    axes = [f"--config.mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), mesh)]
    config, _ = train.parse_args(["--config", "tiny_coarse.py", *SHORT, "--config.steps=4", *axes])
    rows = coarse.run_coarse(config, path, show_progress=False)
    assert [r["step"] for r in rows] == [4] and np.isfinite(rows[0]["reward/mean"])
    assert comparable(metrics.read_metrics(path))[:3] == comparable(metrics.read_metrics(two))
    assert weights_relative(two, path, step=3) == 0.0  # the copy's checkpoint 3 is untouched


# ----------------------------------------------------------------------------- under a real SLURM


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    import one_node_slurm

    why = one_node_slurm.missing()
    if why:
        pytest.skip(why)
    with one_node_slurm.cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def sbatch_command(env, script, tasks, devices, workdir, args, gpu_option, *flags):
    """(argv, env, log) of `sbatch` for a launch script, unchanged, on this node's CPUs: the CPU overrides are
    sbatch options and environment variables only."""
    env = {
        **cli_env(),
        **env,
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "CONFIG": "configs/tiny_coarse.py",
        "WORKDIR": str(workdir),
    }
    out = workdir.parent / f"{workdir.name}-slurm.out"
    return (
        [
            "sbatch",
            *flags,
            "--nodes=1",
            f"--ntasks-per-node={tasks}",
            gpu_option,
            "--cpus-per-task=1",
            f"--output={out}",
            f"launch/{script}",
            *map(str, args),
        ],
        env,
        out,
    )


def sbatch(env, script, tasks, devices, workdir, args, gpu_option):
    """`sbatch --wait` of a launch script; its log."""
    argv, env, out = sbatch_command(env, script, tasks, devices, workdir, args, gpu_option, "--wait")
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stderr, out.read_text()[-3000:] if out.exists() else "")
    return out.read_text()


def test_slurms_early_warning_saves_the_step_requeues_and_ends_as_the_unbroken_run(slurm, demo_2x4, tmp_path):
    """USR1 to the batch shell, as --signal=B:USR1@N sends it: every task saves its current step and exits 75,
    the script requeues the job, and the requeued job resumes to the end of the unbroken run."""
    two, _ = demo_2x4
    base, rm = models_of(two)
    path = tmp_path / "run"
    argv, env, out = sbatch_command(
        {**slurm, "BASE": str(base), "REWARD": str(rm)},
        "slurm_2x8_a100.sbatch",
        2,
        4,
        path,
        [*SHORT, *STEPS, "--config.checkpoint_every=100"],
        "--gpus-per-node=0",
        "--parsable",
    )
    job = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 300
    while not metrics.read_metrics(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    signalled, requeued = time.monotonic(), None
    while time.monotonic() < deadline + 300 and not (out.exists() and "done:" in out.read_text()):
        if requeued is None and out.exists() and "requeueing" in out.read_text():
            requeued = time.monotonic()
        time.sleep(0.2)
    log = out.read_text()
    saved = re.search(r"stopped at step (\d+) on a signal", log)
    print(
        f"SLURM USR1: step {saved and saved.group(1)} saved, requeue {(requeued or 0) - signalled:.1f} s after "
        "the signal"
    )
    assert "stopped to be resumed: requeueing job" in log and "done:" in log, log[-3000:]
    assert comparable(metrics.read_metrics(path)) == comparable(metrics.read_metrics(two))
    assert weights_relative(two, path, step=3) == 0.0


def test_the_launch_script_under_slurm_equals_the_env_var_run(slurm, demo_2x4, tmp_path):
    """One task per node (here: 2 tasks on the one node), jax.distributed initialised from SLURM's variables."""
    two, _ = demo_2x4
    base, rm = models_of(two)
    log = sbatch(
        {**slurm, "BASE": str(base), "REWARD": str(rm)},
        "slurm_2x8_a100.sbatch",
        2,
        4,
        tmp_path / "run",
        [*SHORT, *STEPS],
        "--gpus-per-node=0",
    )
    assert "done:" in log
    assert comparable(metrics.read_metrics(tmp_path / "run")) == comparable(metrics.read_metrics(two))
    assert weights_relative(two, tmp_path / "run", step=3) == 0.0


def test_the_one_task_per_gpu_launch_script_under_slurm(slurm, demo, tmp_path):
    one, rows = demo
    base, rm = models_of(one)
    sbatch(
        {**slurm, "BASE": str(base), "REWARD": str(rm)},
        "slurm_16x1_a100.sbatch",
        4,
        2,
        tmp_path / "run",
        [*SHORT, "--config.steps=1"],
        "--gpus-per-task=0",
    )
    assert worst_relative(metrics.read_metrics(tmp_path / "run")[0], rows[0])[0] < 1e-5
    assert weights_relative(one, tmp_path / "run", step=1) < 1e-5
