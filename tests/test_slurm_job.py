"""src/slurm_job.py without a cluster: where a process says it runs, and how a job that SLURM started again
goes on. (tests/test_slurm.py takes a node away from a real two-node job.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from src import slurm_job
from src.config import TrainConfig
from src.run_context import RunContext

SWEEP_JOB = RunContext(overrides=("model.hidden=8", "trainer.max_epochs=3"), sweep_dir=Path("/sweep"), job_num=0)


@pytest.fixture
def restarted(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")


def test_each_process_of_a_slurm_job_says_its_job_task_and_node(monkeypatch, capsys):
    slurm_job.say_where.cache_clear()
    for key, value in {"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "1",
                       "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURMD_NODENAME": "n2"}.items():
        monkeypatch.setenv(key, value)
    slurm_job.say_where()
    slurm_job.say_where()  # once a process
    assert capsys.readouterr().out == "SLURM job 40_1: task 1 of 2 on node n2\n"
    slurm_job.say_where.cache_clear()
    monkeypatch.delenv("SLURM_JOB_ID")
    slurm_job.say_where()
    assert capsys.readouterr().out == ""  # not a SLURM job: nothing
    slurm_job.say_where.cache_clear()


def test_a_first_start_is_left_as_configured(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    config = TrainConfig()
    assert slurm_job.going_on(config, tmp_path, SWEEP_JOB) is config


def test_a_restarted_job_of_a_sweep_goes_on_from_its_folders_last_ckpt(tmp_path, restarted, capsys):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.touch()
    config = slurm_job.going_on(TrainConfig(ckpt_path="/elsewhere/last.ckpt"), tmp_path, SWEEP_JOB)
    assert config.ckpt_path == str(last) and config.model == TrainConfig().model

    slurm_job.record_going_on(tmp_path, {"global_step": 150, "epoch": 0}, first_process=True)
    assert capsys.readouterr().out == (f"SLURM started this job again (restart 1); going on from {last} at step 150, "
                                       "not from step 0\n")
    assert json.loads((tmp_path / "resumed.json").read_text()) == {"restart": 1, "step": 150}
    assert slurm_job.resumed_note(tmp_path) == "step 150 (SLURM restart 1)"
    assert slurm_job.resumed_note(tmp_path / "other") == ""


def test_the_other_processes_say_it_but_leave_the_record_to_the_first(tmp_path, restarted, capsys):
    slurm_job.record_going_on(tmp_path, {"global_step": 7, "epoch": 0}, first_process=False)
    assert "going on from" in capsys.readouterr().out and not (tmp_path / "resumed.json").exists()


def test_a_restarted_job_of_a_sweep_without_last_ckpt_cannot_go_on(tmp_path, restarted):
    with pytest.raises(slurm_job.CannotGoOn) as error:
        slurm_job.going_on(TrainConfig(), tmp_path, SWEEP_JOB)
    assert str(error.value) == (
        f"SLURM started job 12 again (restart 1: after a node failure or a preemption) and "
        f"{tmp_path / 'checkpoints' / 'last.ckpt'} is missing, so it cannot go on where it stopped; run it again "
        "with: python -m src.train model.hidden=8 trainer.max_epochs=3")


def test_a_restarted_run_of_its_own_in_a_new_folder_says_it_starts_from_step_0(tmp_path, restarted, capsys):
    config = TrainConfig()
    assert slurm_job.going_on(config, tmp_path, RunContext()) is config
    assert capsys.readouterr().err == ("warning: SLURM started this job again (restart 1) in a new run folder, so it "
                                       "starts from step 0; a run given hydra.run.dir=FOLDER goes on from FOLDER's "
                                       "last.ckpt\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()  # its hydra.run.dir, given again: it goes on
    assert slurm_job.going_on(config, tmp_path, RunContext()).ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")
