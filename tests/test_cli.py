"""The installed commands and the rules every command shares: --help, config lookup, the output rule, torn
files and stale locks."""

import importlib
import json
import os
import socket
import sys
import tomllib

import pytest
from conftest import ROOT

from c2f_jax import train
from c2f_jax.runtime import metrics, workdir, workdir_lock

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_nine_commands_are_installed_entry_points():
    assert sorted(SCRIPTS) == sorted(
        f"c2f-{n}" for n in ("train", "export", "merge", "generate", "evaluate", "sweep", "plot", "plan", "lm-eval")
    )
    for target in SCRIPTS.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_answers_help(name, capsys, monkeypatch):
    module = importlib.import_module(SCRIPTS[name].partition(":")[0])
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    try:
        code = module.main(["--help"])
    except SystemExit as e:  # argparse's --help
        code = e.code
    assert code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_a_bare_config_name_is_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.resolve_config_path("tiny_coarse.py") == str(train.CONFIG_DIR / "tiny_coarse.py")
    assert (train.CONFIG_DIR / "coarse.py").is_file()


def test_a_key_given_twice_takes_the_later_value():
    config, _ = train.parse_args(
        [
            "--config",
            "tiny_coarse.py",
            "--config.cm.buckets=(4,)",
            "--config.cm.buckets",
            "(8, 16)",
            "--config.steps=3",
            "--config.steps=5",
        ]
    )
    assert tuple(config.cm.buckets) == (8, 16) and config.steps == 5


# ----------------------------------------------------------------------------- the output rule


def test_an_existing_output_is_replaced_only_when_asked(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(workdir.WorkdirError, match=r"already exists \(pass --overwrite to replace it\)"):
        workdir.check_output(tmp_path / "out", {})
    workdir.check_output(tmp_path / "out", {}, overwrite=True)
    workdir.check_output(tmp_path / "new", {})


def test_a_file_never_replaces_a_folder_nor_a_folder_a_file(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(workdir.WorkdirError, match="is a folder; a file would replace it"):
        workdir.check_output(tmp_path / "folder", {}, overwrite=True, folder=False)
    with pytest.raises(workdir.WorkdirError, match="is a file, not a folder"):
        workdir.check_output(tmp_path / "file", {}, overwrite=True, folder=True)
    with pytest.raises(workdir.WorkdirError, match="is a folder"):  # the writer keeps the rule too
        workdir.write(tmp_path / "folder", lambda tmp: tmp.write_text("png"), overwrite=True)
    assert (tmp_path / "folder").is_dir()


def test_a_training_workdir_is_never_an_output(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / workdir.RUN_CONFIG).write_text("{}")
    for out, folder in ((run, True), (run / "export", True), (run / "checkpoints" / "x.png", False)):
        with pytest.raises(workdir.WorkdirError, match="the training workdir"):
            workdir.check_output(out, {}, overwrite=True, folder=folder)
    workdir.check_output(run / workdir.RUN_PLOT, {}, overwrite=True, folder=False)  # the workdir's own plot


def test_an_output_apart_from_its_inputs(tmp_path):
    (tmp_path / "model").mkdir()
    for out, relation in ((tmp_path / "model", "is"), (tmp_path / "model" / "o", "is inside"), (tmp_path, "contains")):
        with pytest.raises(workdir.WorkdirError, match=f"{relation} the input --sft"):
            workdir.check_output(out, {"--sft": tmp_path / "model"}, overwrite=True)


# ----------------------------------------------------------------------------- torn files


def _metrics(tmp_path, *lines):
    (tmp_path / workdir.METRICS).write_text("".join(line + "\n" for line in lines[:-1]) + lines[-1])


def test_a_torn_last_metrics_line_is_named_or_dropped_when_resuming(tmp_path, capsys):
    _metrics(tmp_path, '{"step": 1, "x": 1.0}', '{"step": 2, "x": 2.0}', '{"step": 3, "x')
    with pytest.raises(workdir.WorkdirError, match=r"metrics\.jsonl:3: not a metrics row: torn"):
        metrics.read_metrics(tmp_path)
    assert [r["step"] for r in metrics.read_metrics(tmp_path, drop_torn_last_line=True)] == [1, 2]
    assert "metrics.jsonl:3: dropped a torn last line" in capsys.readouterr().err
    writer = metrics.MetricsWriter(tmp_path, resume_step=2)  # what a resume from step 2 keeps
    writer.close()
    assert (tmp_path / workdir.METRICS).read_text() == '{"step": 1, "x": 1.0}\n{"step": 2, "x": 2.0}\n'


def test_a_garbled_metrics_row_before_the_end_is_an_error_even_when_resuming(tmp_path):
    _metrics(tmp_path, '{"step": 1, "x": 1.0}', "garbage", '{"step": 3, "x": 3.0}\n')
    with pytest.raises(workdir.WorkdirError, match=r"metrics\.jsonl:2: not a metrics row"):
        metrics.read_metrics(tmp_path, drop_torn_last_line=True)


@pytest.mark.parametrize("pid", ["abc", 1 << 40, -3, 0, True])
def test_a_lock_whose_process_cannot_exist_here_is_taken_over(pid, tmp_path, capsys):
    lock = tmp_path / workdir_lock.LOCK
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "start_ticks": None, "since": "x"}))
    workdir_lock.hold(tmp_path)
    try:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert "cannot exist on this host" in capsys.readouterr().err
    finally:
        workdir_lock.release(tmp_path)


def test_a_lock_of_a_live_job_is_refused_naming_the_lock_file(tmp_path):
    lock = tmp_path / workdir_lock.LOCK
    lock.write_text(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getppid(),
                "start_ticks": workdir_lock._start_ticks(os.getppid()),
                "since": "x",
            }
        )
    )
    with pytest.raises(workdir_lock.HeldError, match=f"in {lock}"):
        workdir_lock.hold(tmp_path)


def test_export_refuses_a_checkpoint_holding_nan_naming_the_tensor(tmp_path, monkeypatch):
    """What export reads back from a checkpoint is checked as the weights of any input model are."""
    import numpy as np

    from c2f_jax.model import export

    class Restored:  # a checkpoint whose actor holds a NaN, as training would never write it
        def __init__(self, path):
            pass

        def restore_subtree(self, keys, step):
            return {"model": {"norm": np.array([1.0, np.nan], np.float32)}}, {}

        def latest_step(self):
            return 7

        def close(self):
            pass

    run = tmp_path / "run"
    run.mkdir()
    (run / workdir.RUN_CONFIG).write_text(json.dumps({"job": "coarse"}))
    from c2f_jax.model import model

    (run / workdir.MODEL_CONFIG).write_text(json.dumps(model.TINY.to_hf()))
    monkeypatch.setattr(export.checkpoint, "Checkpointer", Restored)
    with pytest.raises(workdir.WorkdirError, match=r"checkpoints/7: tensor actor/params/model/norm holds NaN or inf"):
        export.export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
