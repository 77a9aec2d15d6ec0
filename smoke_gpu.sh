#!/usr/bin/env bash
# make smoke-gpu: the whole pipeline (reward stage, safety stage, RSA(P), evaluation with per-category tables) on
# SmolLM2-135M-Instruct on one CUDA GPU at the papers' lengths (512 tokens), in bf16, then once more with
# --load_in_4bit; prints tokens/s, peak GPU memory and wall time per stage, and the held-out accuracy and KL.
# Without CUDA it stops with one line. Not yet run on a GPU: no GPU was lent to the sessions that wrote it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/smoke-gpu}
STEPS=${STEPS:-50}
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "smoke-gpu: needs a CUDA GPU and this machine has none (make demo runs the whole pipeline on the CPU)" >&2
  exit 2
fi
mkdir -p "$OUT"
if [ ! -f "$OUT/sft/config.json" ]; then  # the GGUF de-quantised once into a safetensors folder (4-bit needs one)
  $PY -c "import stage, study_real; g = study_real.smollm2_gguf(); stage.load_base_model(g).save_pretrained('$OUT/sft');
stage.load_tokenizer(g).save_pretrained('$OUT/sft')"
fi
DATA=assets/hh-rlhf-harmless-base-test.jsonl.gz
L="--max_length 512 --max_prompt_length 256 --batch_size 8 --max_steps $STEPS --eval_every 25 --save_every 25
   --eval_pairs 64 --log_every 10"
for mode in bf16 4bit; do
  extra=(); [ "$mode" = 4bit ] && extra=(--load_in_4bit)
  echo "== $mode: reward stage, safety stage, RSA(P), evaluation -> $OUT/$mode"
  $PY train_reward_stage.py --sft "$OUT/sft" --data "$DATA" --out "$OUT/$mode/reward" $L "${extra[@]}"
  $PY train_safety_stage.py --reward_stage "$OUT/$mode/reward" --data "$DATA" --out "$OUT/$mode/safety" $L \
      "${extra[@]}"
  $PY merge_policies.py --first "$OUT/$mode/reward" --second "$OUT/$mode/safety" --q 0.5 --out "$OUT/$mode/mix"
  $PY evaluate.py --policies "$OUT/sft" "$OUT/$mode/reward" "$OUT/$mode/safety" "$OUT/$mode/mix/q0.5" \
      --prompts redteam --scorer none --greedy --num_samples 1 --max_new_tokens 128 --out "$OUT/$mode/eval"
done
$PY - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
print("| run | stage | steps | wall (s) | tokens/s | peak GPU memory (GB) | held-out accuracy | KL chosen |")
print("|---|---|---|---|---|---|---|---|")
for mode in ("bf16", "4bit"):
    for name in ("reward", "safety"):
        folder = os.path.join(out, mode, name)
        done = json.load(open(os.path.join(folder, "complete.json")))
        train = [json.loads(l) for l in open(os.path.join(folder, "metrics.jsonl")) if '"train"' in l]
        last, final = train[-1], done["final_eval"]
        print(f"| {mode} | {name} | {done['steps']} | {done['seconds']} | {last['tokens_per_s']:.0f} | "
              f"{last.get('max_memory_gb', float('nan')):.2f} | {final['rewards/accuracies']:.3f} | "
              f"{final['kl/chosen']:.3f} |")
PYEOF
