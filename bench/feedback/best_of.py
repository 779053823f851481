"""(issue 15, session 8) From label pairs, one SFT conversation per prompt group: the rater's top answer (most pairs won),
or with --random a random answer of the group (the control). usage: best_of.py PAIRS OUT [--random]"""
import json, random, sys, collections
src, out = sys.argv[1:3]; rnd = "--random" in sys.argv
groups = collections.defaultdict(lambda: {"prompt": None, "wins": collections.Counter(), "seen": []})
for line in open(src):
    r = json.loads(line)
    g = groups[r["group"]]; g["prompt"] = r["prompt"]
    c, j = r["chosen"][0]["content"], r["rejected"][0]["content"]
    for t in (c, j):
        if t not in g["seen"]: g["seen"].append(t)
    g["wins"][c] += 1; g["wins"][j] += 0
rng = random.Random(0); n = 0
with open(out, "w") as f:
    for k, g in sorted(groups.items()):
        best = rng.choice(g["seen"]) if rnd else max(g["seen"], key=lambda t: g["wins"][t])
        f.write(json.dumps({"messages": g["prompt"] + [{"role": "assistant", "content": best}]}) + "\n"); n += 1
print(n, "conversations")
