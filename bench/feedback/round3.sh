#!/bin/bash
# (issue 15, session 9) A third RLHF round after bench/feedback/iterate_rm.sh: ROUND2's 40-iteration
# PPO policy (ROUND2/ppo2x: `lmschool ppo ... --reward ROUND2/reward2 --out ROUND2/ppo2x max_steps=40`)
# labels RUN's prompts, the reward model trains on all three rounds' pairs, PPO 40 iterations from SFT.
#   bash bench/feedback/round3.sh runs/demo /tmp/round2 /tmp/round3
set -euo pipefail
RUN=$1; R2=$2; OUT=$3; L=${LMSCHOOL:-.venv/bin/lmschool}
mkdir -p "$OUT"
$L label --policy "$R2/ppo2x" --prompts "$RUN/world/prompts.jsonl" --out "$OUT/prefs_ppo.jsonl" --config configs/label.yaml seed=2
python3 - "$RUN/label/prefs.jsonl" "$R2/prefs_both.jsonl" "$OUT/prefs_ppo.jsonl" "$OUT/prefs_all.jsonl" <<'PY'
import json, sys
first = [json.loads(l) for l in open(sys.argv[1])]
held = {json.dumps(r["prompt"]) for r in first if r.get("split") == "test"}
both = [json.loads(l) for l in open(sys.argv[2])]
third = [dict(r, split="train", group=r["group"] + 2 * 10**6) for r in map(json.loads, open(sys.argv[3]))
         if json.dumps(r["prompt"]) not in held]
with open(sys.argv[4], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in both + third)
print(len(both), "earlier pairs,", len(third), "round-3 training pairs")
PY
$L reward --init "$RUN/sft" --data "$OUT/prefs_all.jsonl" --out "$OUT/reward3" --config configs/reward.yaml
$L ppo --init "$RUN/sft" --reward "$OUT/reward3" --prompts "$RUN/world/prompts.jsonl" --eval "$RUN/world/eval.jsonl" \
    --out "$OUT/ppo3" --config configs/ppo.yaml max_steps=40
