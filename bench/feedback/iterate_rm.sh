#!/bin/bash
# (issue 15, session 9) One more round of RLHF, as InstructGPT and Llama 2 iterate: POLICY's answers
# to RUN's prompts labelled by the rater, the reward model trained again from SFT on PAIRS (the
# earlier rounds' pairs) plus these, PPO again from SFT against it. RUN is a finished `lmschool run`
# directory; ROUND (2, 3 ...) seeds the labelling and numbers the new prompt groups; OUT gets
# prefs_all.jsonl, reward/ and ppo/; further key=value go to PPO.
#   bash bench/feedback/iterate_rm.sh runs/demo /tmp/round2 runs/demo/ppo runs/demo/label/prefs.jsonl 2
#   bash bench/feedback/iterate_rm.sh runs/demo /tmp/round2x runs/demo/ppo runs/demo/label/prefs.jsonl 2 max_steps=40
#   bash bench/feedback/iterate_rm.sh runs/demo /tmp/round3 /tmp/round2x/ppo /tmp/round2/prefs_all.jsonl 3 max_steps=40
set -euo pipefail
RUN=$1; OUT=$2; POLICY=$3; PAIRS=$4; ROUND=$5; shift 5
L=${LMSCHOOL:-.venv/bin/lmschool}
mkdir -p "$OUT"
$L label --policy "$POLICY" --prompts "$RUN/world/prompts.jsonl" --out "$OUT/prefs_new.jsonl" --config configs/label.yaml seed=$((ROUND - 1))
# the new pairs all train, none on a prompt round 1 holds out (their groups from ROUND - 1 million): the
# reward models' held-out accuracy is then read on the same pairs, round 1's test split
python3 - "$RUN/label/prefs.jsonl" "$PAIRS" "$OUT/prefs_new.jsonl" "$OUT/prefs_all.jsonl" "$ROUND" <<'PY'
import json, sys
held = {json.dumps(r["prompt"]) for r in map(json.loads, open(sys.argv[1])) if r.get("split") == "test"}
earlier = [json.loads(l) for l in open(sys.argv[2])]
offset = (int(sys.argv[5]) - 1) * 10**6
new = [dict(r, split="train", group=r["group"] + offset) for r in map(json.loads, open(sys.argv[3]))
       if json.dumps(r["prompt"]) not in held]
with open(sys.argv[4], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in earlier + new)
print(f"{len(earlier)} earlier pairs, {len(new)} new training pairs")
PY
$L reward --init "$RUN/sft" --data "$OUT/prefs_all.jsonl" --out "$OUT/reward" --config configs/reward.yaml
$L ppo --init "$RUN/sft" --reward "$OUT/reward" --prompts "$RUN/world/prompts.jsonl" --eval "$RUN/world/eval.jsonl" \
    --out "$OUT/ppo" --config configs/ppo.yaml "$@"
