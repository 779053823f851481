#!/bin/bash
# (issue 15, session 9) A second round of RLHF, as InstructGPT and Llama 2 iterate: the round-1 PPO
# policy's answers labelled by the rater, the reward model retrained on both rounds' pairs, PPO again
# from SFT against it. RUN is a finished `lmschool run` directory; OUT gets the round-2 runs.
#   bash bench/feedback/iterate_rm.sh runs/demo /tmp/round2
set -euo pipefail
RUN=$1; OUT=$2; L=${LMSCHOOL:-.venv/bin/lmschool}
mkdir -p "$OUT"
$L label --policy "$RUN/ppo" --prompts "$RUN/world/prompts.jsonl" --out "$OUT/prefs_ppo.jsonl" --config configs/label.yaml seed=1
# round 2's pairs all train, none on a prompt round 1 holds out: the reward models' held-out accuracy
# is then read on the same pairs (round 1's test split)
python3 - "$RUN/label/prefs.jsonl" "$OUT/prefs_ppo.jsonl" "$OUT/prefs_both.jsonl" <<'PY'
import json, sys
first = [json.loads(l) for l in open(sys.argv[1])]
held = {json.dumps(r["prompt"]) for r in first if r.get("split") == "test"}
second = [dict(r, split="train", group=r["group"] + 10**6) for r in map(json.loads, open(sys.argv[2]))
          if json.dumps(r["prompt"]) not in held]
with open(sys.argv[3], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in first + second)
print(f"{len(first)} round-1 pairs, {len(second)} round-2 training pairs")
PY
$L reward --init "$RUN/sft" --data "$OUT/prefs_both.jsonl" --out "$OUT/reward2" --config configs/reward.yaml
$L ppo --init "$RUN/sft" --reward "$OUT/reward2" --prompts "$RUN/world/prompts.jsonl" --eval "$RUN/world/eval.jsonl" \
    --out "$OUT/ppo2" --config configs/ppo.yaml
