"""Stage 1's school-world measure: does the pre-trained model complete facts it has read?

Each probe is a corpus-phrased prefix ("Mia Smith lives in") and its answer ("Oakford"); the
model continues the prefix greedily and is right when the continuation starts with the answer
as a whole word. Reported over all pupils, and separately over the held-out ones (whose facts
only the corpus states: the knowledge SFT must later carry from reading into chat).
"""

from __future__ import annotations

import torch

from lmschool.generate import generate
from lmschool.world.facts import FACT_TYPES
from lmschool.world.generate import completion_probes


def is_completion(text: str, answer: str) -> bool:
    text = text.lstrip()
    if not text.lower().startswith(answer.lower()):
        return False
    rest = text[len(answer):]
    return not rest or not rest[0].isalnum()


@torch.no_grad()
def fact_completion(model, tokenizer, world: dict, batch_size: int = 256, max_new_tokens: int = 5) -> dict:
    """Greedy completion accuracy over every pupil and fact type; also held-out pupils alone and
    per fact type. Probes come from `completion_probes` (pupils in world order, facts in order)."""
    hits = {}                                       # (heldout, fact) -> [correct, total]
    for heldout in (False, True):
        probes = completion_probes(world, heldout=heldout)
        for i in range(0, len(probes), batch_size):
            chunk = probes[i:i + batch_size]
            # In the token stream every document follows an end-of-document token: so does a probe.
            prompts = [[tokenizer.eos_id, *tokenizer.encode(prefix, add_special_tokens=False)]
                       for prefix, _ in chunk]
            out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_ids=[tokenizer.eos_id], pad_id=tokenizer.pad_id or 0)
            for j, ((_, answer), toks) in enumerate(zip(chunk, out.tokens)):
                cell = hits.setdefault((heldout, FACT_TYPES[(i + j) % len(FACT_TYPES)]), [0, 0])
                cell[0] += is_completion(tokenizer.decode(toks, skip_special=True), answer)
                cell[1] += 1

    def rate(cells):
        cells = list(cells)
        return sum(c for c, _ in cells) / max(sum(n for _, n in cells), 1)

    return {
        "fact_completion": rate(hits.values()),
        "fact_completion_probes": sum(n for _, n in hits.values()),
        "fact_completion_heldout": rate(v for (h, _), v in hits.items() if h),
        "fact_completion_seen": rate(v for (h, _), v in hits.items() if not h),
        "fact_completion_by_fact": {f: rate(v for (_, g), v in hits.items() if g == f) for f in FACT_TYPES},
    }
