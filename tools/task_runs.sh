#!/usr/bin/env bash
# The task experiments of the README in one call: train plain and chain-of-thought addition
# (same model, same steps), export each, score 1,000 held-out sums with the C++ runtime
# (babyrt eval-task) and draw the analysis figures. Results: $OUT/tasks.tar.gz.
#   DEVICE=cuda bash tools/task_runs.sh          (STEPS=N overrides the presets' step count)
set -euo pipefail
OUT=${OUT:-task_out}; mkdir -p "$OUT"
W=$(mktemp -d)
DEVICE=${DEVICE:-cuda}
TASKS=${TASKS:-add cot-add}
for t in $TASKS; do
  babyrt train --task "$t" --preset "task-$t" --out "$W/$t" --device "$DEVICE" \
    ${STEPS:+--max-steps $STEPS} > "$W/$t.train.log" 2>&1 &
done
wait
for t in $TASKS; do
  tail -c 300 "$W/$t.train.log"; echo
  babyrt export "$W/$t" --out "$W/$t-artifact"
  babyrt eval-task "$W/$t-artifact" --task "$t" --json "$W/$t/eval.json"
  python3 -m babyrt.training.analysis "$W/$t" --task "$t" --out "$W/$t/figures" > /dev/null
done
(cd "$W" && tar czf - $(for t in $TASKS; do echo "$t/log.json $t/summary.json $t/config.json $t/eval.json $t/figures $t/loss.png"; done)) > "$OUT/tasks.tar.gz"
echo "wrote $OUT/tasks.tar.gz"
