#!/usr/bin/env bash
# Start, or resume, one teacher's runs of the equal-compute experiment (docs/results.md) from a git
# worktree of its pinned commit, so that later commits cannot change them mid-run; 1 thread.
# mnist: its own pinned commit (the amendment in docs/results.md: runs that survive a restart);
# digits_flow: the flow-matching experiment (docs/results.md, its own rule and pinned commit).
# mnist-b: a second MNIST slot, its seeds from the last down into mnist_b.json, for when the other
# slot is free; stop both when they meet and merge (benchmarks/merge_seed_runs.py).
#
#   bash benchmarks/equal_compute_runs.sh digits|digits_dequantized|mnist|mnist-b|digits_flow   # two at a time at most
#
# The JSON goes to the worktree's benchmarks/results/equal_compute/TEACHER.json (digits_flow:
# benchmarks/results/flow_matching/digits_flow.json); a JSON that this
# checkout holds (committed runs of an earlier session) is copied there first when the worktree has
# none, so the runs continue where they stopped.
set -euo pipefail
PINNED=f80f8394a63868fd1d50793ac0ca76c00fd69400
experiment=equal_compute tree_name=equal-compute
teacher=${1:?"give digits, digits_dequantized, mnist, mnist-b or digits_flow"}
case "$teacher" in digits|digits_dequantized) ;;
  mnist|mnist-b) PINNED=f5d202bd09e1abf86aba808245568d44cdb14fdf tree_name=equal-compute-mnist ;;
  digits_flow) PINNED=6c16d840575114294256ff1b8e86c75cbe00854a experiment=flow_matching tree_name=flow-matching ;;
  *) echo "unknown teacher $teacher; allowed: digits, digits_dequantized, mnist, mnist-b, digits_flow" >&2; exit 2 ;;
esac
root=$(git rev-parse --show-toplevel)
tree="$root/../nni-2ndmatch-$tree_name"
[ -d "$tree" ] || git -C "$root" worktree add --detach "$tree" "$PINNED"
[ "$(git -C "$tree" rev-parse HEAD)" = "$PINNED" ] || { echo "$tree is not at $PINNED" >&2; exit 1; }
out=benchmarks/results/$experiment/${teacher//-/_}.json
mkdir -p "$tree/benchmarks/results/$experiment"
for f in "$out" "${out%.json}.md"; do
  [ -f "$tree/$f" ] || [ ! -f "$root/$f" ] || cp "$root/$f" "$tree/$f"
done
seeds=100,101,102,103,104,105,106,107,108,109,110,111
finetuners=kd,2ndmatch compute=kd,kd-perturb,2ndmatch,2ndmatch-every8 noise_draws=4
case "$teacher" in
  digits) args=(--data digits --samples 8000 --cost benchmarks/results/run_cost_digits.json) ;;
  digits_dequantized) args=(--data digits --samples 8000 --cost benchmarks/results/run_cost_digits.json
                            --teacher benchmarks/teachers/digits_dequantized --dequantize) ;;
  mnist|mnist-b) seeds=100,101,102,103,104,105,106,107
         args=(--data mnist --samples 8000 --sample-batch 64 --cost benchmarks/results/run_cost_mnist.json)
         # the second slot: the seeds the first has not reached, from the last down; the first slot
         # measures the evaluation's noise (its first seed)
         [ "$teacher" = mnist ] || { seeds=107,106,105,104,103,102; noise_draws=0; } ;;
  digits_flow) seeds=200,201,202,203,204,205,206,207,208,209
               finetuners=kd,2ndmatch-paper,2ndmatch compute=kd,2ndmatch-paper,2ndmatch
               args=(--data digits --samples 8000 --teacher benchmarks/teachers/digits_flow
                     --cost benchmarks/results/run_cost_digits_flow.json) ;;
esac
python=${PYTHON:-$root/.venv/bin/python}
cd "$tree"
OMP_NUM_THREADS=1 exec "$python" benchmarks/digits_quality.py "${args[@]}" --seeds "$seeds" --ratio 0.3 \
  --steps 3000 --batch-size 2 --lr 2e-4 --ema-decay 0.9983 --dropout 0.1 --threads 1 --eval-noise-draws "$noise_draws" \
  --finetuners "$finetuners" --budget equal-compute --compute-arms "$compute" \
  --lambda-jac 1.0 --jac-reference-dims 1 --jac-match vector --jac-weighting noise --out "$out"
