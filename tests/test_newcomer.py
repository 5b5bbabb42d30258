"""A newcomer's first hour (issue 15): Ctrl-C answered at once, ``--resume
--workdir`` alone, one folder per command, feedback while it is slow.

Real runs use the ``smoke`` config on a cached dataset and the persistent
compilation cache; the Ctrl-C case is a real ``pso-jax train`` subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import chex
import jax
import pytest

from pso_jax import checkpoint as ckpt
from pso_jax import cli, experiment
from pso_jax.experiment import loop
from pso_jax.experiment.report import _Progress
from pso_jax.experiment.run import _Run

_CACHE: list[str] = []  # the module's persistent compilation cache


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    _CACHE.append(str(cache))
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(tmp_path_factory.mktemp("tfds"))


def _final_state(workdir: Path, cfg):
    run = _Run(cfg, experiment._source(cfg, "train"))
    state, _ = ckpt.restore(workdir / "checkpoints", run.abstract_state())
    return state


def _log(workdir: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(x).items() if k != "wall_seconds"}
        for x in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


# -- 1. blocks: a signal waits at most ~2 s, and the blocks change no bit -----


def test_block_lengths_keep_a_signal_waiting_at_most_two_seconds():
    clock = loop._Clock(t_start=0.0)
    assert loop._block_length(0, 20, 100, clock) == 1  # first: measures
    clock.timed(1, 0.05)  # 0.05 s a step: 40 fit in 2 s, k=20 caps
    assert loop._block_length(1, 20, 100, clock) == 19  # up to a multiple of k
    assert loop._block_length(20, 20, 100, clock) == 20
    assert loop._block_length(90, 20, 100, clock) == 10  # ends at steps
    slow = loop._Clock(t_start=0.0)
    slow.timed(1, 0.5)  # 4 steps fit in 2 s
    assert loop._block_length(20, 20, 100, slow) == 4
    slower = loop._Clock(t_start=0.0)
    slower.timed(1, 40.0)  # the r2plus1d: one step at a time
    assert loop._block_length(20, 20, 100, slower) == 1


def test_interrupted_resumed_and_extended_run_is_bit_identical(
    data_dir, tmp_path, monkeypatch, capsys
):
    """Stopped after its first block, resumed by ``--resume --workdir`` alone in
    blocks of other lengths, then extended with ``--steps 9``: the same bits as
    one uninterrupted 9-step run over the 6-step schedule."""
    full_cfg = experiment.get_config(
        "smoke", data_dir=data_dir, steps=9, schedule_steps=6
    )
    experiment.train(full_cfg, tmp_path / "full", progress=False)

    def stop_after_first_block(step, state):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = experiment.get_config("smoke", data_dir=data_dir)
    part = tmp_path / "part"
    out = experiment.train(cfg, part, progress=False, on_step=stop_after_first_block)
    assert out == {"interrupted": True, "signal": signal.SIGINT, "steps": 1}
    err = capsys.readouterr().err
    assert "pso-jax: SIGINT: stopping after this step (step 1); saving a " in err
    assert ckpt.all_steps(part / "checkpoints") == [1]
    monkeypatch.setattr(loop, "BLOCK_SECONDS", 1e-9)  # single steps from here on
    assert cli.main(["train", "--resume", "--workdir", str(part)]) == 0
    assert json.loads((part / "summary.json").read_text())["steps"] == 6
    monkeypatch.setattr(loop, "BLOCK_SECONDS", 2.0)
    argv = ["train", "--resume", "--workdir", str(part), "--steps", "9"]
    assert cli.main([*argv, "--no-progress"]) == 0
    stored = experiment.read_config(part / "config.json")
    assert (stored.steps, stored.schedule_steps) == (9, 6)
    assert stored == full_cfg
    chex.assert_trees_all_equal(
        _final_state(part, full_cfg), _final_state(tmp_path / "full", full_cfg)
    )
    assert _log(part) == _log(tmp_path / "full")


def test_second_interrupt_says_what_it_loses():
    interrupt = loop._Interrupt()
    interrupt.saving, interrupt.saved = 20, 10
    assert interrupt._second_message() == (
        "checkpoint of step 20 abandoned; the previous one (step 10) is intact"
    )
    interrupt.saving, interrupt.saved, interrupt.step = None, None, 7
    assert interrupt._second_message() == (
        "quit without a checkpoint of step 7; no checkpoint was written yet"
    )


def test_ctrl_c_to_pso_jax_train_is_answered_within_seconds(data_dir, tmp_path):
    """A real ``pso-jax train``: one SIGINT while training; it says so at once,
    checkpoints, exits 130 naming the resume command; that command finishes."""
    workdir = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--steps", "150", "--data-dir", data_dir]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": _CACHE[-1],
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pso_jax.cli", *argv, "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any(line.startswith("pso-jax: step ") for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    proc.wait(timeout=30)
    waited = time.monotonic() - t0
    reader.join(timeout=5)
    proc.stderr.close()
    err = "".join(lines)
    assert proc.returncode == 130, err[-2000:]
    assert waited < 10, (waited, err[-2000:])  # a ~2 s block, then the save
    assert "pso-jax: SIGINT: stopping after this step (step " in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pso-jax: interrupted by SIGINT at step "), err[-2000:]
    assert last.endswith(f"continue with: pso-jax train --resume --workdir {workdir}")
    assert "Traceback" not in err
    stopped = int(last.split(" at step ")[1].split(";")[0])
    assert 0 < stopped < 150 and ckpt.latest_step(workdir / "checkpoints") == stopped
    # The resume command as printed.
    rc = cli.main(["train", "--resume", "--workdir", str(workdir), "--no-progress"])
    assert rc == 0
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 150


# -- 2. --resume reads config.json; only some flags may change ----------------


@pytest.fixture
def saved_run(tmp_path):
    """A work directory with a config.json (no training: the checks come first)."""
    cfg = experiment.get_config("smoke", model="r2plus1d", particles=32, steps=40)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    return tmp_path, cfg


def _args(argv):
    return cli._parser().parse_args(argv)


def test_resume_alone_continues_the_saved_config(saved_run, capsys):
    workdir, cfg = saved_run
    args = _args(["train", "--resume", "--workdir", str(workdir)])
    assert cli._resume_config(args, workdir) == cfg
    # The README's form: --config does not override the saved fields.
    args = _args(
        ["train", "--config", "default", "--resume", "--workdir", f"{workdir}"]
    )
    assert cli._resume_config(args, workdir) == cfg
    assert capsys.readouterr().err.strip() == (
        f"pso-jax: note: --resume continues {workdir} from its config.json; "
        "--config default is not applied (the run keeps its dataset_config, "
        "model, width, particles, steps, local_steps, batch_size, inertia, "
        "cognitive, social, augment, steps_per_call, eval_every, "
        "checkpoint_every, top_k)"
    )
    args = _args(["train", "--config", "smoke", "--resume", "--workdir", f"{workdir}"])
    assert cli._resume_config(args, workdir) == cfg
    assert "--config smoke" in capsys.readouterr().err  # model etc. differ
    # Flags equal to the saved values are fine.
    args = _args(["train", "--resume", "--workdir", str(workdir), "--particles", "32"])
    assert cli._resume_config(args, workdir) == cfg


def test_resume_may_extend_and_retime_but_not_change_the_run(saved_run, capsys):
    workdir, cfg = saved_run
    argv = ["train", "--resume", "--workdir", str(workdir)]
    args = _args([*argv, "--steps", "600", "--time-budget", "60", "--eval-every", "5"])
    got = cli._resume_config(args, workdir)
    assert (got.steps, got.schedule_steps, got.time_budget, got.eval_every) == (
        600,
        40,  # the cosine schedule keeps its span: the run's first 40 steps
        60.0,
        5,
    )
    rc = cli.main([*argv, "--particles", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 4
    assert err == (
        f"pso-jax: error: --particles 16: the run in {workdir} has particles=32 "
        "(its config.json); resume without --particles (--resume reads it from "
        "there), or start a new run with another --workdir"
    )
    rc = cli.main([*argv, "--model", "c3d"])
    assert rc == 4 and "--model c3d: the run in" in capsys.readouterr().err


def test_library_resume_keeps_the_schedule_span(saved_run):
    workdir, cfg = saved_run
    import dataclasses

    longer = dataclasses.replace(cfg, steps=80)
    with pytest.raises(experiment.RunFileError, match="schedule_steps=40"):
        loop._check_resume_config(workdir, longer)
    assert loop._check_resume_config(
        workdir, dataclasses.replace(longer, schedule_steps=40)
    )
    assert not loop._check_resume_config(workdir, cfg)


def test_old_config_json_without_schedule_steps_reads_back(saved_run):
    workdir, cfg = saved_run
    stored = cfg.to_dict()
    del stored["schedule_steps"]
    (workdir / "config.json").write_text(json.dumps(stored))
    assert experiment.read_config(workdir / "config.json") == cfg


# -- 3. each command its own folder --------------------------------------------


def test_demo_rastrigin_writes_its_own_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_out").mkdir()
    (tmp_path / "demo_out" / "keep").write_text("make demo's")
    assert cli.main(["demo", "--rastrigin", "--steps", "5"]) == 0
    assert (tmp_path / "demo_rastrigin_out" / "summary.json").is_file()
    assert os.listdir(tmp_path / "demo_out") == ["keep"]


def test_train_default_workdir_skips_a_folder_holding_a_run(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert cli._default_workdir("demo", resume=False) == Path("demo_out")
    (tmp_path / "demo_out" / "checkpoints").mkdir(parents=True)  # make demo's
    assert cli._default_workdir("demo", resume=False) == Path("demo_out_2")
    assert capsys.readouterr().err.strip() == (
        "pso-jax: note: demo_out holds another run; writing to demo_out_2 "
        "(--workdir chooses the folder)"
    )
    assert cli._default_workdir("demo", resume=True) == Path("demo_out")


# -- 4. feedback: phases, plain progress lines, compile time ------------------


def test_plain_progress_lines_without_a_terminal(capsys):
    bar = _Progress(True, 100, 0, 4)
    assert bar.plain  # pytest's stderr is not a terminal
    with bar as update:
        for step in range(1, 101):
            update(step, {"best_fitness": 2.0, "mean_fitness": None}, 0.5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10  # every 10 % of the steps
    assert lines[0] == ("pso-jax: step 10/100: best 2 mean -, 0.5 s/step, ETA 00:00:45")


def test_progress_bar_counts_the_evaluations_that_ran(monkeypatch):
    # 5 steps of 4 particles, then 5 of 1 (after a narrowing) in 10 s: 2.5/s.
    from pso_jax.experiment import report

    clock = {"t": 0.0}
    monkeypatch.setattr(report.time, "perf_counter", lambda: clock["t"])
    bar = _Progress(True, 10, 0, 4)
    bar.plain = False  # the rich bar, as on a terminal
    with bar as update:
        for step in range(1, 11):
            clock["t"] = float(step)
            ran = 4 if step <= 5 else 1
            update(step, {"best_fitness": 2.0, "mean_fitness": 2.5}, 1.0, ran)
        assert bar.progress.tasks[0].fields["rate"] == "2.5"


def test_run_prints_its_phases_and_times_compile_apart(data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--data-dir", data_dir, "--steps", "3"]
    assert cli.main([*argv, "--workdir", str(workdir)]) == 0
    out, err = capsys.readouterr()
    phases = [  # on stdout, with the result line
        f"pso-jax: writing {workdir} (3 steps of 4 particles)",
        "pso-jax: preparing the dataset moving_shapes/small",
        "pso-jax: building c3d and the swarm ...",
        "pso-jax: compiling the train step ...",
        "pso-jax: compiled in ",
        " s per step; about ",
        "test accuracy ",
    ]
    at = [out.find(p) for p in phases]
    assert -1 not in at and at == sorted(at), out
    assert "pso-jax: step 3/3: best " in err  # the plain progress lines
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["compile_seconds"] > 0
    assert 0 < summary["seconds_per_step"] < summary["compile_seconds"]
    # 5. class names beside the confusion matrix and the per-class recall.
    names = summary["class_names"]
    assert names[:2] == ["left", "right"] and len(names) == 10
    assert len(summary["test_per_class_recall"]) == len(names)
    # evaluate writes its own files and says when it rewrites them.
    before = (workdir / "confusion.png").read_bytes()
    assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {workdir}/evaluation.json" in out
    assert f"wrote {workdir}/evaluation_confusion.png" in out
    assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"rewrote {workdir}/evaluation.json" in out
    assert (workdir / "confusion.png").read_bytes() == before
    assert json.loads((workdir / "evaluation.json").read_text())["class_names"] == names


# -- 5. the offline-dataset error, the convergence plot's words ---------------

_NOT_PREPARED = (
    "ucf101 is not prepared in /data/ucf101/2.0.0, and these source files are not "
    "in manual_dir=None:\n    UCF101.rar\n    UCF101TrainTestSplits.zip\nEither\n"
    "  * pass download=True (needs network access);\n  * or pass the folder of a "
    "dataset already prepared (...): load_real('/data/ucf101/<config>/<version>');"
)


def test_offline_dataset_error_names_flags_and_files(tmp_path, monkeypatch, capsys):
    from pso_jax import data
    from pso_jax.data.real import DatasetNotPreparedError

    def load_real(*args, **kwargs):
        raise DatasetNotPreparedError(_NOT_PREPARED)

    monkeypatch.setattr(data, "load_real", load_real)
    argv = ["train", "--config", "smoke", "--dataset", "ucf101", "--num-classes", "101"]
    argv += ["--data-dir", str(tmp_path), "--workdir", str(tmp_path / "run")]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 5
    assert err.strip().splitlines()[-1] == (
        f"pso-jax: error: --dataset ucf101: not prepared in {tmp_path} (--data-dir) "
        "and not downloaded (offline): place UCF101.rar, UCF101TrainTestSplits.zip "
        f"in {tmp_path}/downloads/manual/ and run again, or pass --dataset with the "
        f"folder of a copy prepared elsewhere ({tmp_path}/ucf101/<config>/<version>, "
        "array_record format)"
    )
    assert "load_real" not in err and "manual_dir" not in err


def test_convergence_plot_says_what_its_lines_are(tmp_path, monkeypatch):
    from pso_jax.experiment import report

    figures = []
    real = report._figure

    def recorded(figsize):
        fig, ax = real(figsize)
        figures.append(fig)
        return fig, ax

    monkeypatch.setattr(report, "_figure", recorded)
    records = [
        {"step": s, "best_fitness": 2.0 / s, "mean_fitness": 2.5 / s}
        for s in range(1, 4)
    ]
    cfg = experiment.get_config("smoke")
    report._plot_convergence(records, tmp_path / "convergence.png", cfg)
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_xlabel() == "swarm step"
    assert ax.get_ylabel() == "cross-entropy loss on the batch"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["swarm best (re-scored on each batch)", "swarm mean"]
    assert any("re-scored on each step's batch" in t.get_text() for t in fig.texts)
