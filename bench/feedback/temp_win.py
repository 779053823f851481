"""(issue 15, session 8) Sampled win rate of MODEL at temperature T against REF at T=1 (same seeds), with conduct figures:
how much a sharper distribution alone would win. usage: temp_win.py MODEL REF EVAL T [T ...]"""
import json, sys
import torch
from lmschool.checkpoint import load_model
from lmschool.data.prompts import read_prompts
from lmschool.evaluate import sample_responses, conduct, _wins, _mean, _fields
from lmschool.judges import make_judge
from lmschool.stages.common import open_init
torch.set_grad_enabled(False)
pol, ref, ev = sys.argv[1:4]
init, tok = open_init(pol)
policy = load_model(init, head="lm").eval()
reference = load_model(open_init(ref)[0], head="lm").eval()
rows = read_prompts(ev)
judge = make_judge(None, beside=[ev])
prompts = [tok.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
qs = [r["prompt"] for r in rows]; cats = [str(r.get("category")) for r in rows]
f = _fields(rows, list(range(len(rows))))
def judged(model, T):
    ids = sample_responses(model, tok, prompts, samples=1, max_new_tokens=128, batch_size=32, seed=1, temperature=T)
    texts = [tok.decode(a, skip_special=True).strip() for a in ids]
    s, parts = judge(qs, texts, **f)
    return s, conduct(judge, qs, texts, parts, cats)
base, bc = judged(reference, 1.0)
print("ref T=1", json.dumps({k: round(v, 3) for k, v in bc.items() if k in ("flaw_rate", "hallucination_rate", "behaviour_score")}), "score", round(_mean(base), 3))
for T in map(float, sys.argv[4:]):
    s, c = judged(policy, T)
    w = _wins(s, base)
    print(f"T={T}", "win", round(_mean(w), 3), w.count(1.0), w.count(0.5), w.count(0.0), "score", round(_mean(s), 3),
          json.dumps({k: round(v, 3) for k, v in c.items() if k in ("flaw_rate", "hallucination_rate", "behaviour_score")}), flush=True)
