#!/usr/bin/env bash
# The whole RSA pipeline on the toy world: world + SFT -> reward stage -> safety stage -> RSA(P) -> evaluation.
# `make demo` runs it with the defaults below; the test suite runs it in miniature (SIZE=tiny, few steps).
# A re-run reuses every finished step (the stages' completeness markers) and only re-evaluates.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
WORLD=${WORLD:-worlds/toy}
SIZE=${SIZE:-full}          # toy world size: full (about a minute) or tiny (seconds)
STEPS=${STEPS:-150}         # optimizer steps per stage
SAMPLES=${SAMPLES:-32}      # samples per evaluation prompt
QS=${QS:-"0.25 0.5 0.75 0.9"}
STAGE="--max_length 64 --max_prompt_length 32 --batch_size 16 --lr 5e-3 --lora_r 8 --max_steps $STEPS
       --eval_every 50 --log_every 25 --precision fp32 --dtype float32"  # fp32 everywhere: the README's table on any host

echo "== 1/5 toy world and SFT model -> $WORLD"
$PY -m toy build --out "$WORLD" --size "$SIZE"
echo "== 2/5 reward stage (helpfulness, Ra-DPO_2, reference = SFT) -> $OUT/reward"
$PY train_reward_stage.py --sft "$WORLD/sft" --data "$WORLD/train.jsonl" --eval_data "$WORLD/test.jsonl" \
    --out "$OUT/reward" $STAGE
echo "== 3/5 safety stage (harmlessness, reference = reward-stage policy) -> $OUT/safety"
$PY train_safety_stage.py --reward_stage "$OUT/reward" --data "$WORLD/train.jsonl" --eval_data "$WORLD/test.jsonl" \
    --out "$OUT/safety" $STAGE
echo "== 4/5 RSA(P) mixtures, q = $QS -> $OUT/mix"
# shellcheck disable=SC2086
$PY merge_policies.py --first "$OUT/reward" --second "$OUT/safety" --q $QS --out "$OUT/mix"
echo "== 5/5 evaluation with the toy world's ground truth -> $OUT"
MIXES=()
for q in $QS; do MIXES+=("$OUT/mix/q$q"); done
$PY evaluate.py --policies "$WORLD/sft" "$OUT/reward" "$OUT/safety" "${MIXES[@]}" --prompts "$WORLD" --scorer toy \
    --num_samples "$SAMPLES" --max_new_tokens 24 --kl_pairs "$WORLD/test.jsonl" --dtype float32 --out "$OUT"
echo "== done: $OUT/results.json, $OUT/report.md, $OUT/frontier.png"
