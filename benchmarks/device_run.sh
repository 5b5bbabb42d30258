#!/usr/bin/env bash
# Benchmarks 1, 3 and 4 (swarm step, video fitness, learning curves) on a GPU
# machine, in one go, sized to fit a short lease of the machine (~9 min).
#
#   bash benchmarks/device_run.sh OUTDIR
#
# Runs from the repository root with the machine's own python3 (PYTHON=...),
# which must import jax with a GPU backend, torch (EvoX), and this project's
# other dependencies; pso_jax is imported from the checkout (PYTHONPATH=.).
# Each benchmark has its own time limit, so one that fails or runs long leaves
# the others' results; logs go to OUTDIR/*.log, results as the scripts name
# them (learning curves under OUTDIR/learning_curves/). Results of such a run
# live in benchmarks/results/<device>/ with the date and this command in them.
set -u
out=${1:?usage: benchmarks/device_run.sh OUTDIR}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

{ nvidia-smi; "$py" -c 'import jax, torch; print(jax.__version__, jax.devices(),
  torch.__version__, torch.cuda.is_available())'; } >"$out/machine.txt" 2>&1

run() {  # run NAME SECONDS ARGS...: one benchmark, killed after SECONDS
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$py" "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$out/status.txt"
}

# Swarm step: the full grid, largest cells first (the headline N=1024, D=1e5
# before anything a time limit could cut); EvoX (torch.compile, seconds per
# cell) at N=1024 only; pyswarms (numpy, host CPU) where 3 iterations take
# under 8 s.
run swarm_step 200 benchmarks/swarm_step.py --out "$out" --repeats 3 \
  --min-call-s 0.1 --evox-ns 1024 --pyswarms-max-s 8 --largest-first \
  --time-limit 160
# Video fitness: the default clip config, every model and variant, P = 8/32/128
# (the markdown is rewritten after every cell).
run video_fitness 90 benchmarks/video_fitness.py --configs default \
  --repeats 5 --time-limit 60 --out "$out/video_fitness.md"
# Learning curves: 4 runs of 15 s each; a probe per run compiles first.
run learning_curves 220 benchmarks/learning_curves.py --budget 15 \
  --out "$out/learning_curves"
