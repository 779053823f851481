"""(issue 15, session 8) win rate and conduct of POLICY against REFERENCE on EVAL (sampled, as the policy stages judge)."""
import json, sys
from lmschool.checkpoint import load_model
from lmschool.data.prompts import read_prompts
from lmschool.evaluate import evaluate_policy
from lmschool.judges import make_judge
from lmschool.stages.common import open_init
pol, ref, ev = sys.argv[1:4]
init, tok = open_init(pol)
policy, reference = load_model(init, head="lm").eval(), load_model(open_init(ref)[0], head="lm").eval()
rows = read_prompts(ev)
judge = make_judge(None, beside=[ev])
s, _ = evaluate_policy(policy, reference, tok, rows, judge, kl_samples=1, seed=0)
print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()
                  if k in ("win_rate_vs_sft", "wins", "ties", "losses", "flaw_rate", "hallucination_rate",
                           "refusal_correct", "fact_correct", "kl_from_sft", "behaviour_score", "sft_flaw_rate")}))
