"""The command line and the run files under misuse and damage (issue 14).

Families, each a table of cases:

- every numeric flag checked (finite, in range) before any data or compile, the
  error naming the flag and the value, one line, its exit code (``cli.main``
  in-process: well under a second each);
- the data against the model (class count, clip shape, batch size against the
  split, labels), on the host before compiling;
- one writer per work directory: a real subprocess holding the lock makes
  ``train``, ``evaluate`` and ``minimize`` fail at once naming it; stale locks;
- damaged run files: a torn or damaged ``metrics.jsonl`` line, a bad
  ``config.json``, strict JSON (no ``Infinity``) in everything written;
- SIGTERM/SIGINT from the start of a command (143/130, one line);
- the exit-code table, ``--debug``.

One real (smoke) training run at the end checks its files and a ``--resume``
over a torn last metrics line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import checkpoint as ckpt
from pso_jax import cli, experiment
from pso_jax.experiment import loop
from pso_jax.experiment.config import read_config
from pso_jax.experiment.input_pipeline import (
    DataError,
    _check_data,
    _check_labels,
    _eval_batches,
)
from pso_jax.experiment.metrics import (
    _json_text,
    _read_metrics,
    _truncate_metrics,
    _write_json,
)

SMOKE = ["train", "--config", "smoke", "--no-progress"]


def _strict_loads(text: str):
    """``json.loads`` as a strict (RFC 8259) reader: no NaN or Infinity."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _run_cli(argv, capsys) -> tuple[int, str]:
    """``cli.main(argv)`` in-process: its exit code (SystemExit's too) and stderr."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("pso-jax: error: "), err
    return lines[0]


# -- every numeric flag: finite, in range, before any data or compile ----------

FLAG_CASES = [
    # (flags, exit code, parts of the one error line)
    (["--init-scale", "inf"], 2, ["--init-scale inf", "finite number >= 0"]),
    (["--init-scale", "-0.1"], 2, ["--init-scale -0.1", ">= 0"]),
    (["--cognitive", "inf"], 2, ["--cognitive inf", "finite"]),
    (["--social", "-1"], 2, ["--social -1", ">= 0"]),
    (["--inertia", "nan"], 2, ["--inertia nan", "finite"]),
    (["--lr", "inf"], 2, ["--lr inf", "finite number > 0"]),
    (["--lr", "0"], 2, ["--lr 0", "> 0"]),
    (["--weight-decay=-1e-4"], 2, ["--weight-decay -0.0001", ">= 0"]),
    (["--time-budget", "inf"], 2, ["--time-budget inf", "> 0"]),
    (["--exploit-fraction", "nan"], 2, ["--exploit-fraction nan", "finite"]),
    (["--exploit-fraction", "0.9"], 2, ["--exploit-fraction 0.9", "(0, 0.5]"]),
    (["--exploit-every", "-3"], 2, ["--exploit-every -3", "int >= 0"]),
    (["--local-steps", "-1"], 2, ["--local-steps -1", "int >= 0"]),
    (["--eval-every", "-1"], 2, ["--eval-every -1", "int >= 0"]),
    (["--checkpoint-every", "-5"], 2, ["--checkpoint-every -5", "int >= 0"]),
    (["--seed", "-1"], 2, ["--seed -1", "[0, 4294967295]"]),
    (["--seed", str(2**32)], 2, ["--seed 4294967296", "[0, 4294967295]"]),
    (["--num-classes", "1"], 2, ["--num-classes 1", "int >= 2"]),
    (["--dataset-config", "tiny"], 2, ["--dataset-config tiny", "small"]),
    # argparse's own checks: one line too, naming the flag.
    (["--lr-range", "1e-4,inf"], 2, ["argument --lr-range", "finite", "1e-4,inf"]),
    (["--wd-range", "1e-2,1e-4"], 2, ["argument --wd-range", "LOW <= HIGH"]),
    (["--devices", "0"], 2, ["argument --devices", "got 0", "'all'"]),
    (["--devices", "-2"], 2, ["argument --devices", "got -2"]),
    (["--particles", "0"], 2, ["argument --particles", "must be >= 1, got 0"]),
    (["--batch-size", "0"], 2, ["argument --batch-size", "must be >= 1, got 0"]),
    (["--num-frames", "0"], 2, ["argument --num-frames", "must be >= 1, got 0"]),
    (["--process-id", "-1"], 2, ["argument --process-id", "must be >= 0"]),
    (["--patch", "2,0,2"], 2, ["argument --patch", "2,0,2"]),
    # The data against the model (moving_shapes: from its config, not generated).
    (["--num-classes", "3"], 5, ["--num-classes 3", "has 10 classes", "0..9"]),
    (["--num-classes", "12"], 5, ["--num-classes 12", "has 10 classes"]),
    (["--batch-size", "2001"], 5, ["--batch-size 2001", "(2000 clips)"]),
    (["--patch", "3,4,4"], 5, ["--patch 3,4,4", "8x32x32", "not divisible"]),
    (["--num-frames", "2"], 5, ["patch=(2, 4, 4)", "num_frames=2", "empty"]),
    (["--model", "x3d", "--patch", "1,32,32"], 5, ["--patch 1,32,32", "empty"]),
]


@pytest.mark.parametrize(
    "flags, code, parts", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES]
)
def test_bad_train_flag_is_one_line_before_any_data(
    flags, code, parts, tmp_path, capsys
):
    data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
    data_dir.mkdir()
    argv = [*SMOKE, "--data-dir", str(data_dir), "--workdir", str(workdir), *flags]
    t0 = time.perf_counter()
    rc, err = _run_cli(argv, capsys)
    seconds = time.perf_counter() - t0
    assert rc == code, err
    line = _one_error_line(err)
    for part in parts:
        assert part in line, (part, line)
    assert "Traceback" not in err
    # Raised before the dataset is generated, the workdir made or anything
    # compiled.
    assert list(data_dir.iterdir()) == [] and not workdir.exists()
    assert seconds < 5.0


def test_minimize_and_demo_flags_are_checked(capsys):
    for argv, part in (
        (["minimize", "--seed", "-1"], "argument --seed"),
        (["minimize", "--dims", "0"], "argument --dims"),
        (["demo", "--seed", str(2**40)], "argument --seed"),
        (["evaluate", "--workdir", "x", "--step", "-1"], "argument --step"),
    ):
        rc, err = _run_cli(argv, capsys)
        assert rc == 2 and part in _one_error_line(err), (argv, err)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"init_scale": math.inf}, "init_scale=inf"),
        ({"cognitive": math.inf}, "cognitive=inf"),
        ({"social": math.nan}, "social=nan"),
        ({"inertia": -math.inf}, "inertia=-inf"),
        ({"weight_decay": math.nan}, "weight_decay=nan"),
        ({"learning_rate": "0.1"}, "learning_rate='0.1'"),
        ({"num_frames": 0}, "num_frames=0"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"seed": -1}, "seed=-1"),
        ({"top_k": 0}, "top_k=0"),
        ({"particles": True}, "particles=True"),
        ({"augment": "yes"}, "augment='yes'"),
        ({"dataset": ""}, "dataset=''"),
        ({"wd_range": (1e-4, math.inf)}, r"wd_range=\(0.0001, inf\)"),
        ({"exploit_fraction": math.nan}, "exploit_fraction=nan"),
        ({"time_budget": math.inf}, "time_budget=inf"),
    ],
)
def test_config_fields_are_finite_and_in_range(override, field):
    with pytest.raises(experiment.ConfigError, match=field) as info:
        experiment.get_config("smoke", **override)
    assert info.value.field == next(iter(override))


# -- the data against the model ------------------------------------------------


def _fake_source(num_classes, video_shape, size=100, first=(8, 32, 32, 3)):
    """A TFDS-like source: ``dataset_info`` features, ``len`` and ``[0]``."""
    features = {
        "label": SimpleNamespace(num_classes=num_classes),
        "video": SimpleNamespace(shape=video_shape),
    }
    info = SimpleNamespace(features=features)

    class Source(list):
        dataset_info = info

    return Source([{"video": np.zeros(first, np.uint8), "label": 0}] * size)


@pytest.mark.parametrize(
    "source_kw, cfg_kw, match",
    [
        (
            {"num_classes": 5, "video_shape": (8, 32, 32, 3)},
            {"num_classes": 3},
            r"num_classes=3: some_ds has 5 classes \(labels 0..4\)",
        ),
        (
            {"num_classes": 5, "video_shape": (8, 32, 32, 3), "size": 20},
            {"batch_size": 32},
            r"batch_size=32: larger than .* \(20 clips\)",
        ),
        (
            {"num_classes": 5, "video_shape": (None, 32, 32, 3)},
            {},
            "differ in length: pass num_frames",
        ),
        (
            {"num_classes": 5, "video_shape": (8, None, None, 3)},
            {},
            "frames of some_ds differ in size",
        ),
        (
            {"num_classes": 5, "video_shape": (8, 30, 32, 3)},
            {},
            "not divisible by tubelet",
        ),
        (
            {"num_classes": None, "video_shape": (8, 32, 32, 3)},
            {"patch": (8, 4, 4)},
            "empty output",
        ),
    ],
)
def test_data_and_model_disagree_on_the_host(source_kw, cfg_kw, match):
    cfg = experiment.get_config(
        "smoke", **{"dataset": "some_ds", "batch_size": 8, **cfg_kw}
    )
    with pytest.raises(DataError, match=match):
        _check_data(cfg, _fake_source(**source_kw))


def test_data_that_fits_passes_and_unknown_data_waits_for_its_source():
    cfg = experiment.get_config("smoke", dataset="some_ds", batch_size=8)
    _check_data(cfg)  # not moving_shapes: nothing known before its source loads
    _check_data(cfg, _fake_source(5, (8, 32, 32, 3)))
    # A variable length with num_frames: the pipeline cuts fixed windows.
    cut = experiment.get_config("smoke", dataset="some_ds", num_frames=4)
    _check_data(cut, _fake_source(5, (None, 32, 32, 3)))


@pytest.mark.parametrize(
    "labels, num_classes, bad",
    [
        ([0, 9, 3], 10, None),
        ([0, 10], 10, 10),
        ([[1, 2], [3, 12]], 10, 12),
        ([-1, 0], 10, -1),
        ([2], 3, None),
        ([3], 3, 3),
    ],
)
def test_labels_outside_the_classes_are_a_data_error(labels, num_classes, bad):
    if bad is None:
        _check_labels(np.asarray(labels), num_classes, "batch 0")
        return
    with pytest.raises(DataError, match=f"batch 0 has label {bad}, outside"):
        _check_labels(np.asarray(labels), num_classes, "batch 0")


def _clips(labels):
    return [{"video": np.zeros((8, 32, 32, 3), np.uint8), "label": y} for y in labels]


@pytest.mark.parametrize("where", ["train", "test"])
def test_batch_labels_are_checked_before_they_reach_the_model(where):
    """A dataset that does not state its class count: its labels are checked."""
    cfg = experiment.get_config("smoke", batch_size=2)
    source = _clips([0, 1, 2, 7])  # 4 classes given, label 7 in the data
    if where == "train":
        run = SimpleNamespace(cfg=cfg, num_classes=4)
        clock = loop._Clock(t_start=0.0)
        batches = [
            {k: np.stack([c[k] for c in clips]) for k in ("video", "label")}
            for clips in (source[:2], source[2:])
        ]
        with pytest.raises(DataError, match="train batches of steps 1..2 has label 7"):
            loop._run_chunk(run, None, batches, 0, 2, clock)  # no .trainer: not run
        return
    batches = _eval_batches(cfg, source, 2, num_classes=4, split="test")
    assert next(batches)["label"].tolist() == [0, 1]
    with pytest.raises(DataError, match="batch 1 of the test split has label 7"):
        next(batches)


# -- one writer per work directory --------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pso_jax.experiment import lock_workdir
    with lock_workdir(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _hold_lock(workdir: Path, seconds: float = 120.0) -> subprocess.Popen:
    """A real second process that holds ``workdir``'s lock (returns once held)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.fixture(scope="module")
def held_workdir(tmp_path_factory):
    """A work directory (a run's files in it) whose lock another process holds."""
    workdir = tmp_path_factory.mktemp("held")
    cfg = experiment.get_config("smoke")
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict()))
    proc = _hold_lock(workdir)
    yield workdir, proc.pid
    _stop(proc)


@pytest.mark.parametrize(
    "argv",
    [
        SMOKE,
        [*SMOKE, "--resume"],
        ["evaluate"],
        ["minimize", "--objective", "sphere", "--steps", "5"],
    ],
    ids=["train", "train --resume", "evaluate", "minimize"],
)
def test_second_process_fails_at_once_naming_the_holder(
    held_workdir, argv, tmp_path, capsys
):
    workdir, pid = held_workdir
    before = sorted(p.name for p in workdir.iterdir())
    data_dir = tmp_path / "tfds"
    extra = ["--data-dir", str(data_dir)] if argv[0] == "train" else []
    t0 = time.perf_counter()
    rc, err = _run_cli([*argv, *extra, "--workdir", str(workdir)], capsys)
    assert time.perf_counter() - t0 < 5.0  # at once, not after minutes
    assert rc == 3, err
    line = _one_error_line(err)
    for part in (str(workdir), "in use", f"pid {pid}", socket.gethostname(), "-c"):
        assert part in line, (part, line)
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing touched
    assert not data_dir.exists()


def test_lock_is_not_reentrant_and_is_released(tmp_path):
    with experiment.lock_workdir(tmp_path) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid()
        assert holder["host"] == socket.gethostname()
        with (
            pytest.raises(experiment.WorkdirLockedError, match=f"pid {os.getpid()}"),
            experiment.lock_workdir(tmp_path),
        ):
            pass
    assert not path.exists()
    with experiment.lock_workdir(tmp_path / "new"):  # created, then removed: empty
        pass
    assert not (tmp_path / "new").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "content, parts",
    [
        ("dead", ["stale lock", "pid {pid} on {host}", "no longer runs"]),
        ("elsewhere", ["stale lock", "pid 1 on other-host", "no longer holds it"]),
        ("garbage", ["stale lock", "an unknown process", "not json"]),
    ],
)
def test_stale_lock_is_taken_over_with_a_note(content, parts, tmp_path, capsys):
    pid, host = _dead_pid(), socket.gethostname()
    text = {
        "dead": json.dumps({"pid": pid, "host": host, "command": "pso-jax train"}),
        "elsewhere": json.dumps({"pid": 1, "host": "other-host", "command": "x"}),
        "garbage": "not json",
    }[content]
    (tmp_path / experiment.LOCK_FILE).write_text(text)
    with experiment.lock_workdir(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    note = capsys.readouterr().err.strip()
    assert note.startswith("pso-jax: note: took over") and "\n" not in note
    for part in parts:
        assert part.format(pid=pid, host=host) in note, note


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, capsys):
    proc = _hold_lock(tmp_path)
    with (
        pytest.raises(experiment.WorkdirLockedError, match=f"pid {proc.pid}"),
        experiment.lock_workdir(tmp_path),
    ):
        pass
    _stop(proc)  # SIGKILL: the OS releases its flock, its lock file stays
    assert (tmp_path / experiment.LOCK_FILE).exists()
    with experiment.lock_workdir(tmp_path):
        pass
    assert f"pid {proc.pid}" in capsys.readouterr().err


# -- damaged run files ---------------------------------------------------------

GOOD = [{"step": 1, "best_fitness": 2.0}, {"step": 2, "best_fitness": 1.5}]


def _lines(records):
    return [json.dumps(r) for r in records]


@pytest.mark.parametrize(
    "lines, end, kept, note_line",
    [
        (_lines(GOOD), "\n", [1, 2], None),
        ([*_lines(GOOD), '{"step": 3, "best_fit'], "", [1, 2], 3),
        ([*_lines(GOOD), '{"step": 3, "best_fitness": 1.'], "", [1, 2], 3),
        ([*_lines(GOOD), "[3"], "\n", [1, 2], 3),
        ([*_lines(GOOD), "7"], "", [1, 2], 3),  # JSON, but not a record
        ([*_lines(GOOD), "", ""], "\n", [1, 2], None),  # blank lines
        (['{"step": 1, "best_f'], "", [], 1),
    ],
)
def test_torn_last_metrics_line_is_skipped_with_a_note(
    lines, end, kept, note_line, tmp_path
):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + end)
    records, note = _read_metrics(path)
    assert [r["step"] for _, r in records] == kept
    if note_line is None:
        assert note is None
    else:
        assert note.startswith(f"{path}:{note_line}: skipped a torn last line")
    # Resuming cuts the log back to the checkpoint and drops the torn line.
    assert _truncate_metrics(path, 1) == note
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [
        s for s in kept if s <= 1
    ]


@pytest.mark.parametrize(
    "lines, bad_line",
    [
        (['{"step": 1, "best_f', *_lines(GOOD)], 1),
        ([_lines(GOOD)[0], '{"step": 2,, }', _lines(GOOD)[1]], 2),
        ([_lines(GOOD)[0], "[]", _lines(GOOD)[1]], 2),
        ([_lines(GOOD)[0], b"\xff\xfe\x00garbage", _lines(GOOD)[1]], 2),
    ],
)
def test_damaged_metrics_line_before_the_last_names_file_and_line(
    lines, bad_line, tmp_path
):
    path = tmp_path / "metrics.jsonl"
    raw = [x if isinstance(x, bytes) else x.encode() for x in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    before = path.read_bytes()
    with pytest.raises(experiment.RunFileError, match=f"{path}:{bad_line}: not a"):
        _truncate_metrics(path, 5)
    assert path.read_bytes() == before  # not rewritten


def _config_text(**changes) -> str:
    stored = experiment.get_config("smoke").to_dict()
    for k, v in changes.items():
        if v is _DROP:
            del stored[k]
        else:
            stored[k] = v
    return json.dumps(stored)


_DROP = object()
_FULL = _config_text()
CONFIG_CASES = [
    # (config.json's text or None (missing), parts of the error line)
    (None, ["config.json: not found"]),
    ("", ["config.json: empty"]),
    (_FULL[: len(_FULL) // 2], ["config.json: not valid JSON", "line 1 column"]),
    ("[1, 2]", ["config.json: expected a JSON object", "got list"]),
    (_config_text(bogus=1), ["config.json: unknown field 'bogus'"]),
    (_config_text(particles=_DROP), ["config.json: missing field 'particles'"]),
    (_config_text(particles="four"), ["config.json: field particles='four'"]),
    (_config_text(init_scale=None), ["config.json: field init_scale=None"]),
    (_config_text(patch=[2, 4]), ["config.json: field patch=(2, 4)"]),
]


@pytest.mark.parametrize(
    "text, parts", CONFIG_CASES, ids=[str(i) for i in range(len(CONFIG_CASES))]
)
def test_bad_config_json_is_one_line_naming_file_and_field(text, parts, tmp_path):
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(experiment.RunFileError) as info:
        read_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    "text, parts", CONFIG_CASES, ids=[str(i) for i in range(len(CONFIG_CASES))]
)
@pytest.mark.parametrize("command", ["evaluate", "train --resume"])
def test_cli_bad_config_json_exits_4_before_any_data(
    command, text, parts, tmp_path, capsys
):
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    # A checkpoint, so that --resume gets as far as config.json.
    ckpt.save(workdir / "checkpoints", 3, {"x": jnp.zeros(1)})
    if text is not None:
        (workdir / "config.json").write_text(text)
    argv = ["evaluate"] if command == "evaluate" else [*SMOKE, "--resume"]
    if command != "evaluate":
        argv += ["--data-dir", str(data_dir)]
    rc, err = _run_cli([*argv, "--workdir", str(workdir)], capsys)
    assert rc == 4, err
    line = _one_error_line(err)
    for part in parts:
        assert part in line, (part, line)
    assert not data_dir.exists()
    assert not (workdir / experiment.LOCK_FILE).exists()  # released


@pytest.mark.parametrize(
    "obj, clean, non_finite",
    [
        ({"a": 1.0, "b": [1, 2]}, {"a": 1.0, "b": [1, 2]}, None),
        ({"a": math.inf}, {"a": None}, {"a": "inf"}),
        ({"a": [1.0, -math.inf]}, {"a": [1.0, None]}, {"a.1": "-inf"}),
        ({"a": {"b": math.nan}}, {"a": {"b": None}}, {"a.b": "nan"}),
        (
            {"runs": [{"e": np.float32("inf")}]},
            {"runs": [{"e": None}]},
            {"runs.0.e": "inf"},
        ),
        ({"a": np.float64(2.5), "n": None}, {"a": 2.5, "n": None}, None),
    ],
)
def test_written_json_is_strict_with_non_finite_listed(
    obj, clean, non_finite, tmp_path
):
    path = tmp_path / "summary.json"
    _write_json(path, obj)
    got = _strict_loads(path.read_text())
    want = dict(clean) if non_finite is None else {**clean, "non_finite": non_finite}
    assert got == want
    assert _strict_loads(_json_text(obj)) == want  # a metrics.jsonl line
    assert "\n" not in _json_text(obj)


def test_minimize_writes_strict_json(tmp_path, capsys):
    argv = ["minimize", "--objective", "sphere", "--dims", "2", "--particles", "4"]
    rc, _ = _run_cli([*argv, "--steps", "3", "--workdir", str(tmp_path)], capsys)
    assert rc == 0
    _strict_loads((tmp_path / "summary.json").read_text())
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        _strict_loads(line)
    assert not (tmp_path / experiment.LOCK_FILE).exists()


# -- signals from the start of a command ---------------------------------------


@pytest.mark.parametrize(
    "phase, signum, code",
    [
        ("data", signal.SIGTERM, 143),
        ("data", signal.SIGINT, 130),
        ("model", signal.SIGTERM, 143),
        ("model", signal.SIGINT, 130),
    ],
)
def test_signal_before_the_run_has_a_state_writes_nothing(
    phase, signum, code, tmp_path, monkeypatch, capsys
):
    """Preparing data stops at once; building and compiling the model (JAX: an
    exception inside XLA's compiler would crash the exit) at its end."""
    finished = []

    def interrupted_here(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(0.5)  # the handler has run by now
        finished.append(phase)

    if phase == "data":
        monkeypatch.setattr(loop, "_first_source", interrupted_here)
    else:
        monkeypatch.setattr(loop, "_first_source", lambda cfg, split: None)
        monkeypatch.setattr(loop, "_train_batches", lambda cfg, source: None)
        monkeypatch.setattr(loop, "_Run", interrupted_here)
    workdir = tmp_path / "run"
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    rc, err = _run_cli([*SMOKE, "--workdir", str(workdir)], capsys)
    assert rc == code, err
    assert finished == ([] if phase == "data" else ["model"])
    (line,) = err.strip().splitlines()
    name = signal.Signals(signum).name
    assert line == (
        f"pso-jax: interrupted by {name} before the run had a state to "
        "checkpoint; nothing was written"
    )
    assert not workdir.exists()  # created for the lock, removed: nothing written
    # The handlers are the ones before the command again.
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers


def test_sigterm_to_a_starting_pso_jax_train_exits_143(tmp_path):
    """A real ``pso-jax train``, SIGTERM while it prepares its data."""
    workdir = tmp_path / "run"
    argv = [*SMOKE, "--data-dir", str(tmp_path / "tfds"), "--workdir", str(workdir)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pso_jax.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    deadline = time.monotonic() + 60
    while not (workdir / experiment.LOCK_FILE).exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("pso-jax: interrupted by SIGTERM"), err[-2000:]
    assert "Traceback" not in err
    if "nothing was written" in last:
        assert not workdir.exists(), list(workdir.rglob("*"))


# -- the exit codes, --debug, divergence ---------------------------------------


def test_exit_codes_are_documented_in_the_docstring_and_help(capsys):
    documented = {
        int(line.split()[0]) for line in cli.__doc__.splitlines() if line[:1].isdigit()
    }
    assert documented == set(cli.EXIT_CODES)
    rc, _ = _run_cli(["train", "--help"], capsys)
    assert rc == 0
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in cli.EXIT_CODES:
        assert f"\n  {code:<4} " in out, code


@pytest.mark.parametrize(
    "error, code",
    [
        (experiment.ConfigError("particles", 0, "must be >= 1"), 2),
        (ValueError("devices=16: only 8 cpu devices"), 2),
        (experiment.WorkdirLockedError("in use"), 3),
        (experiment.RunFileError("config.json: empty"), 4),
        (ckpt.CheckpointError("damaged"), 4),
        (FileExistsError("already holds checkpoints"), 4),
        (DataError("num_classes", 3, "has 10 classes"), 5),
        (RuntimeError("a bug"), 1),
        (TypeError("another bug"), 1),
    ],
)
def test_each_error_family_has_its_exit_code(error, code, monkeypatch, capsys):
    def train(*args, **kwargs):
        raise error

    monkeypatch.setattr(experiment, "train", train)
    rc, err = _run_cli([*SMOKE, "--workdir", "unused"], capsys)
    assert rc == code
    line = _one_error_line(err)
    if code == 1:
        assert type(error).__name__ in line and "--debug" in line


def test_debug_prints_the_traceback(capsys):
    rc, err = _run_cli([*SMOKE, "--init-scale", "inf", "--debug"], capsys)
    assert rc == 2
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == (
        "pso-jax: error: --init-scale inf: must be a finite number >= 0"
    )
    rc, err = _run_cli(["--debug", *SMOKE, "--init-scale", "inf"], capsys)
    assert rc == 2 and "Traceback" in err


def test_a_diverged_run_exits_6(monkeypatch, capsys):
    summary = {
        "test_accuracy": 0.1,
        "returned_model": "best_particle",
        "ensemble_size": 2,
        "ensemble_test_accuracy": 0.1,
        "test_macro_f1": 0.02,
        "steps": 6,
        "wall_seconds": 1.0,
        "best_train_fitness": math.inf,
    }
    monkeypatch.setattr(experiment, "train", lambda *a, **k: summary)
    rc, err = _run_cli([*SMOKE, "--workdir", "unused"], capsys)
    assert rc == 6
    assert "the run diverged" in _one_error_line(err)


# -- a real run: its files, and --resume over a torn metrics line ---------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A smoke run of 3 steps by ``pso-jax train`` (the slow part of this file)."""
    # The persistent compilation cache makes the resume's compiles cache hits.
    jax.config.update(
        "jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache"))
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = tmp_path_factory.mktemp("runs") / "run"
    flags = [*SMOKE, "--data-dir", data_dir, "--steps", "3", "--steps-per-call", "3"]
    assert cli.main([*flags, "--workdir", str(workdir)]) == 0
    return flags, workdir


def test_a_run_writes_strict_json_and_resumes_over_a_torn_line(
    finished_run, tmp_path, capsys
):
    flags, workdir = finished_run
    for name in ("config.json", "summary.json"):
        _strict_loads((workdir / name).read_text())
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    for line in lines:
        record = _strict_loads(line)
        nulls = {k for k, v in record.items() if v is None}
        assert nulls == set(record.get("non_finite", {})), record
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert not (workdir / experiment.LOCK_FILE).exists()
    # The case: a torn last line (a write cut short) blocked --resume.
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    metrics = copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "best_fitness": 2.3')
    capsys.readouterr()
    assert cli.main([*flags, "--workdir", str(copy), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"pso-jax: note: {metrics}:4: skipped a torn last line" in err
    assert metrics.read_text().splitlines() == lines
    _strict_loads((copy / "summary.json").read_text())


def test_a_signal_once_the_state_exists_checkpoints_it(finished_run, tmp_path):
    """Before the first chunk (here: as it starts), the initial state is saved."""
    flags, _ = finished_run
    data_dir = flags[flags.index("--data-dir") + 1]
    cfg = experiment.get_config("smoke", data_dir=data_dir, steps=3)
    calls = []

    def stop_signal(interrupt):  # a SIGTERM seen at the first check
        calls.append(interrupt.deferred)
        return signal.SIGTERM

    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "_stop_signal", stop_signal)
        out = experiment.train(cfg, tmp_path / "run", progress=False)
    assert out == {"interrupted": True, "signal": signal.SIGTERM, "steps": 0}
    assert calls == [True]  # checked once the state existed, before any chunk
    assert ckpt.all_steps(tmp_path / "run" / "checkpoints") == [0]
    assert read_config(tmp_path / "run" / "config.json") == cfg
