"""Pretrain -> fine-tune on moving_shapes: what self-supervised pretraining adds.

For each pretext ``--objectives`` (:mod:`pso_jax.pretext`): ``pso-jax
pretrain`` (the ``pretrain`` preset: the demo's model, c3d width 8 with 2x2x2
tubelets, 4 particles x 4 Adam steps per swarm step; ``--pretrain-steps``)
on the train split's clips, no labels. Then, for each ``--fractions`` of the
train split's labels and each ``--seeds``:

- **fine-tune** (``pso-jax train --config hybrid`` on the same model,
  ``--finetune-steps``): from scratch, and from each pretrained backbone
  (``--pretrained DIR``, every parameter trained): the same fine-tuning
  budget, the same labeled clips (the seed's ``--label-fraction`` draw);
- **head-only PSO** (``--swarm-over head --local-steps 0``: pure PSO moves only
  the classifier head, the backbone frozen): on a random backbone (the
  model's init) and on each pretrained one.

Writes ``--out``/pretrain_finetune.md (median and range over the seeds, the
command, machine and load) and .json (every run). Work directories go to
``--root``; a finished one (its ``summary.json``) is reused, so an
interrupted benchmark continues where it stopped.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/pretrain_finetune.py \
        --root /tmp/pretrain_bench [--seeds 0,1,2] [--out benchmarks/results]
    # the video Transformer (VideoMAE's masked objective), beside the c3d table:
    PYTHONPATH=. .venv/bin/python benchmarks/pretrain_finetune.py \
        --root /tmp/pretrain_vivit --model vivit --width 64 --patch 2,8,8 \
        --lr 1e-3 --lr-warmup 0.1 --objectives masked,order --fractions 0.1 \
        --budgets 50,150 --head-steps 0 \
        --out benchmarks/results/vivit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.append(str(_HERE))
import _provenance  # noqa: E402  (benchmarks/_provenance.py)

from pso_jax import cli, experiment, flax_utils  # noqa: E402
from pso_jax.experiment.input_pipeline import _source  # noqa: E402
from pso_jax.experiment.run import _Run  # noqa: E402

# The demo's model (the `pretrain` preset's); --model/--width/--patch change it.
MODEL = {"model": "c3d", "width": 8, "patch": (2, 2, 2)}
# Pure PSO on the head: the textbook constriction-equivalent coefficients.
HEAD_PSO = ["--swarm-over", "head", "--local-steps", "0", "--particles", "16"]
HEAD_PSO += ["--inertia", "0.7298", "--cognitive", "1.49618", "--social", "1.49618"]
HEAD_PSO += ["--init-scale", "0.1"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _run(argv: list[str], workdir: Path) -> dict:
    """``pso-jax`` ``argv`` into ``workdir`` (reused when finished): its summary."""
    done = workdir / "summary.json"
    if not done.exists():
        start = time.perf_counter()
        code = cli.main([*argv, "--workdir", str(workdir), "--no-progress"])
        assert code == 0, (argv, code)
        print(f"  {workdir.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(done.read_text())


def _with_constant(summary: dict) -> dict:
    """``summary`` with ``constant_test_loss`` (computed if an older run lacks it)."""
    if "constant_test_loss" not in summary:
        from pso_jax.experiment.pretraining import _constant_loss

        cfg = experiment.TrainConfig(**summary["config"])
        run = _Run(cfg, _source(cfg, "train"))
        summary["constant_test_loss"] = _constant_loss(run, _source(cfg, "test"))
    return summary


def _model_args(model: dict) -> list[str]:
    """``model`` (``MODEL``'s keys) as ``pso-jax`` flags."""
    patch = ",".join(str(p) for p in model["patch"])
    return ["--model", model["model"], "--width", str(model["width"]), "--patch", patch]


def _random_backbone(root: Path, data_dir: str | None, model: dict) -> Path:
    """The model's init (10 classes), saved whole: the head-only baseline's."""
    path = root / "random_backbone"
    if not path.exists():
        cfg = experiment.get_config("hybrid", **model, data_dir=data_dir)
        run = _Run(cfg, _source(cfg, "train"))
        flax_utils.save_params(path, run.template)
    return path


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.3f} [{min(values):.3f}, {max(values):.3f}]"


def _table(rows: list[dict], kind: str, fractions, arms) -> list[str]:
    head = "| start | " + " | ".join(f"{100 * f:g} % of the labels" for f in fractions)
    head += " |"
    lines = [head, "|---|" + "---:|" * len(fractions)]
    for arm in arms:
        cells = []
        for f in fractions:
            acc = [
                r["test_accuracy"]
                for r in rows
                if r["kind"] == kind and r["arm"] == arm and r["fraction"] == f
            ]
            cells.append(_stats(acc))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _gains(rows, kind, base, arms, fractions) -> list[str]:
    """Per seed: arm minus base, in points; median and range."""
    out = []
    for arm in arms:
        for f in fractions:
            by_seed = {
                r["seed"]: r["test_accuracy"]
                for r in rows
                if r["kind"] == kind and r["fraction"] == f and r["arm"] == base
            }
            diffs = [
                100 * (r["test_accuracy"] - by_seed[r["seed"]])
                for r in rows
                if r["kind"] == kind
                and r["fraction"] == f
                and r["arm"] == arm
                and r["seed"] in by_seed
            ]
            if diffs:
                out.append(
                    f"- {kind}, {100 * f:g} % of the labels, {arm} over {base}: median "
                    f"{statistics.median(diffs):+.1f} points, range "
                    f"[{min(diffs):+.1f}, {max(diffs):+.1f}] over {len(diffs)} seeds"
                )
    return out


def _model_label(model: dict) -> str:
    label = f"{model['model']}, width {model['width']}, "
    label += "x".join(str(p) for p in model["patch"]) + " tubelets"
    return label + (" (the demo's)" if model == MODEL else "")


def _markdown(info, command, args, pre: dict, rows: list[dict]) -> str:
    fractions = args.fractions
    objectives = list(pre)
    lines = [
        "# Self-supervised pretraining, then fine-tuning (moving_shapes/small)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_provenance.machine_label(info)}; jax {info['jax']}; "
        f"{info['date']}; load average at start {info['loadavg_start']}, at end "
        f"{list(os.getloadavg())} (the machine is shared); pso_jax sources "
        f"{info['pso_jax_source']}.",
        "",
        f"Model: {_model_label(args.model)}. Test accuracy on the "
        "500 test clips (1 point = 5 clips); median [min, max] over seeds "
        f"{args.seeds}. A seed draws the labeled clips (`--label-fraction`: "
        f"{', '.join(f'{f:g}' for f in fractions)} of the 2,000 train clips) and "
        "the run's randomness; every start of a seed fine-tunes on the same clips. "
        "Runs already finished in `--root` are reused (the benchmark continues "
        "where it stopped): the load average is that of the last invocation.",
        "",
        "## Pretraining (no labels)",
        "",
        f"`pso-jax pretrain --objective O --steps {args.pretrain_steps}` (preset "
        "`pretrain`: 4 particles x 4 Adam steps per swarm step, seed 0"
        f"{f'; lr {args.lr}' if args.lr else ''}"
        f"{f', warmup {args.lr_warmup}' if args.lr_warmup else ''}), the "
        "pretext task's loss on the test clips:",
        "",
        "| objective | test loss, start | test loss, end | best constant guess | "
        "seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for o, s in pre.items():
        told = (
            ""
            if s.get("test_accuracy") is None
            else (f" (order told right: {s['test_accuracy']:.3f})")
        )
        lines.append(
            f"| {o} | {s['initial_test_loss']:.4g} | {s['test_loss']:.4g}{told} | "
            f"{s['constant_test_loss']:.4g} | {s['wall_seconds']:.0f} |"
        )
    budgets = sorted({*args.budgets, args.full_budget})
    for budget in budgets:
        kind = f"finetune{budget}"
        have = sorted({r["fraction"] for r in rows if r["kind"] == kind})
        lines += [
            "",
            f"## Fine-tuning every parameter: {budget} swarm steps of "
            "`--config hybrid` (4 particles x 4 Adam steps, lr "
            f"{args.lr or format(experiment.get_config('hybrid').learning_rate, 'g')}"
            " cosine"
            f"{f', warmup {args.lr_warmup}' if args.lr_warmup else ''}; the "
            "same budget for every start)",
            "",
            *_table(rows, kind, have, ["scratch", *objectives]),
            "",
            *_gains(rows, kind, "scratch", objectives, have),
        ]
    head_fractions = sorted({r["fraction"] for r in rows if r["kind"] == "head_pso"})
    if head_fractions:
        lines += _head_sections(args, rows, head_fractions, objectives)
    lines += [
        "",
        "The pretraining's own compute (the seconds above) is not in the "
        "fine-tuning budget: it is spent once, on unlabeled clips, and serves "
        "every fine-tuning after.",
    ]
    return "\n".join(lines)


def _head_sections(args, rows, head_fractions, objectives) -> list[str]:
    return [
        "",
        f"## Head-only PSO ({args.head_steps} steps of pure PSO, 16 particles, "
        "only the head moves; the backbone frozen)",
        "",
        *_table(rows, "head_pso", head_fractions, ["random", *objectives]),
        "",
        *_gains(rows, "head_pso", "random", objectives, head_fractions),
        "",
        f"## Head-only Adam, a linear probe ({args.head_steps} steps of the "
        "hybrid, 4 particles x 4 Adam steps, only the head moves)",
        "",
        *_table(rows, "head_adam", head_fractions, ["random", *objectives]),
        "",
        *_gains(rows, "head_adam", "random", objectives, head_fractions),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="work directories")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--objectives",
        default="masked,next_frame,order",
        help="pretext tasks; 'masked:dense:0.5' pretrains with --decoder dense "
        "--mask-ratio 0.5",
    )
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument(
        "--budgets",
        type=_ints,
        default=[50, 150],
        help="fine-tuning budgets (swarm steps) at the scarcest fraction",
    )
    p.add_argument("--full-budget", type=int, default=150, help="at 1.0 of the labels")
    p.add_argument("--head-steps", type=int, default=200, help="0: no head-only runs")
    p.add_argument("--model", default=MODEL["model"], help="a pso_jax.models name")
    p.add_argument("--width", type=int, default=MODEL["width"])
    p.add_argument(
        "--patch",
        type=lambda s: tuple(_ints(s)),
        default=MODEL["patch"],
        help="tubelet T,H,W (vivit: e.g. 2,8,8)",
    )
    p.add_argument("--lr", help="Adam's peak, pretraining and fine-tuning alike")
    p.add_argument("--lr-warmup", help="share of the schedule rising from 0")
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--seeds", type=_ints)
    p.add_argument(
        "--full-label-arms",
        default="next_frame",
        help="the pretrained starts also fine-tuned on 1.0 of the labels",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    args.fractions = args.fractions or [0.1, 1.0]
    args.seeds = args.seeds or [0, 1, 2]
    args.model = {"model": args.model, "width": args.width, "patch": args.patch}
    # The model's and Adam's flags, for the pretraining and every fine-tuning.
    flags = _model_args(args.model)
    for flag, value in (("--lr", args.lr), ("--lr-warmup", args.lr_warmup)):
        flags += [] if value is None else [flag, value]
    info = _provenance.machine_info()
    command = _provenance.command_line("pretrain_finetune.py", argv)
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    pre = {}
    for token in args.objectives.split(","):
        # "masked:dense[:0.5]": the objective with that --decoder (and
        # --mask-ratio); its arm is masked_dense[_0.5].
        o, *opts = token.split(":")
        arm = "_".join([o, *opts])
        argv_o = ["pretrain", "--objective", o, "--steps", str(args.pretrain_steps)]
        for flag, value in zip(("--decoder", "--mask-ratio"), opts, strict=False):
            argv_o += [flag, value]
        argv_o += flags
        pre[arm] = _with_constant(_run([*argv_o, *data], root / f"pre_{arm}"))
    # The head-only runs' random backbone: none is needed without them.
    random = args.head_steps and _random_backbone(root, args.data_dir, args.model)
    full_arms = set(args.full_label_arms.split(","))
    rows = []
    scarce = min(args.fractions)
    starts = {"scratch": None, **{o: root / f"pre_{o}" for o in pre}}
    # The scarce labels first (the goal's table), the longest budget first.
    plan = [(scarce, b) for b in sorted(args.budgets, reverse=True)]
    plan += [(f, args.full_budget) for f in args.fractions if f != scarce]
    for f, budget in plan:
        for seed in args.seeds:
            base = ["train", "--config", "hybrid", *flags, *data, "--seed", str(seed)]
            base += ["--label-fraction", str(f)]
            for arm, path in starts.items():
                if f != scarce and path is not None and arm not in full_arms:
                    continue
                extra = [] if path is None else ["--pretrained", str(path)]
                s = _run(
                    [*base, "--steps", str(budget), *extra],
                    root / f"ft{budget}_{arm}_{f:g}_s{seed}",
                )
                rows.append(_row(f"finetune{budget}", arm, f, seed, s))
            if f != scarce or budget != max(args.budgets) or not args.head_steps:
                continue
            head = [*base, "--steps", str(args.head_steps), *HEAD_PSO]
            for arm, path in {"random": random, **starts}.items():
                if path is None:
                    continue
                s = _run(
                    [*head, "--pretrained", str(path)],
                    root / f"head_{arm}_{f:g}_s{seed}",
                )
                rows.append(_row("head_pso", arm, f, seed, s))
                # The same head trained by the hybrid's Adam steps instead (a
                # linear probe of the frozen features): what PSO leaves behind.
                probe = [*base, "--steps", str(args.head_steps)]
                probe += ["--swarm-over", "head", "--pretrained", str(path)]
                s = _run(probe, root / f"probe_{arm}_{f:g}_s{seed}")
                rows.append(_row("head_adam", arm, f, seed, s))
    args.out.mkdir(parents=True, exist_ok=True)
    text = _markdown(info, command, args, pre, rows)
    (args.out / "pretrain_finetune.md").write_text(text + "\n")
    (args.out / "pretrain_finetune.json").write_text(
        json.dumps(
            {
                "info": info,
                "command": command,
                "model": args.model,
                "pretrain": pre,
                "runs": rows,
            },
            indent=1,
        )
    )
    print(text)
    return 0


def _row(kind, arm, fraction, seed, summary) -> dict:
    return {
        "kind": kind,
        "arm": arm,
        "fraction": fraction,
        "seed": seed,
        "test_accuracy": summary["test_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    }


if __name__ == "__main__":
    raise SystemExit(main())
