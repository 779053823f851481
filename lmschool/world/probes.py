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
def fact_completion(model, tokenizer, world: dict, batch_size: int = 128, max_new_tokens: int = 6) -> dict:
    results = {}
    for name, heldout in (("fact_completion", None), ("fact_completion_heldout", True)):
        probes = completion_probes(world, heldout=heldout)
        correct = 0
        by_fact = {f: [0, 0] for f in FACT_TYPES}
        for i in range(0, len(probes), batch_size):
            chunk = probes[i:i + batch_size]
            prompts = [tokenizer.encode(prefix, add_special_tokens=False) for prefix, _ in chunk]
            out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_ids=[tokenizer.eos_id], pad_id=tokenizer.pad_id or 0)
            for j, ((_, answer), toks) in enumerate(zip(chunk, out.tokens)):
                ok = is_completion(tokenizer.decode(toks, skip_special=True), answer)
                correct += ok
                fact = FACT_TYPES[(i + j) % len(FACT_TYPES)]
                by_fact[fact][0] += ok
                by_fact[fact][1] += 1
        results[name] = correct / max(len(probes), 1)
        results[name + "_probes"] = len(probes)
        if heldout is None:
            results["fact_completion_by_fact"] = {f: c / max(n, 1) for f, (c, n) in by_fact.items()}
    return results
