"""Prompts for the model to answer (RL prompts, labelling prompts, eval sets), read one way.

Each line is {"prompt": "..." | [messages ending with a user turn]} with any other keys kept
(category, heldout, expected ...), or {"messages": [...]} whose last user turn is the prompt and the
assistant turn after it the "reference". `read_prompts` gives rows with "prompt" as a message
list and "where" (file:line); `encode_prompts` renders them through the tokenizer's chat template.
"""

from __future__ import annotations

import json

from lmschool.data.jsonl import check_conversation
from lmschool.data.sources import read_rows
from lmschool.errors import DataError

PROMPT_FORMAT = ('expected {"prompt": "..." | [messages ending with a user turn]} (optional: "category", '
               '"heldout", "expected", "reference") or {"messages": [..., user, assistant]}')


def read_prompts(path) -> list[dict]:
    """Rows of a prompts JSONL file, each with "prompt" as a list of messages ending in a user turn.

    A {"messages": [...]} row is taken as the prompt up to its last user turn, with the
    assistant turn after it as "reference". Other keys are kept. Raises DataError at file:line."""
    rows = []
    for where, row in read_rows(path, PROMPT_FORMAT):
        if "prompt" in row:
            prompt = row["prompt"]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        elif "messages" in row:
            messages = check_conversation(row["messages"], where, need_assistant=False)
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise DataError(f"{where}: the conversation has no user turn to answer; {PROMPT_FORMAT}")
            prompt = messages[:users[-1] + 1]
            after = messages[users[-1] + 1:]
            row = {k: v for k, v in row.items() if k != "messages"}
            if after and after[0]["role"] == "assistant":
                row.setdefault("reference", after[0]["content"])
        else:
            raise DataError(f"{where}: {PROMPT_FORMAT}; this line has keys {sorted(row)}")
        check_conversation(prompt, where, need_assistant=False)
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt's last turn is {prompt[-1]['role']}; it must end "
                            "with the user turn the model answers")
        rows.append({**row, "prompt": prompt, "where": where})
    if not rows:
        raise DataError(f"{path}: holds no prompts; {PROMPT_FORMAT}, one per line")
    return rows


def encode_prompts(rows: list[dict], tokenizer, *, context: int, max_new_tokens: int) -> list[list[int]]:
    """The token ids of each row's prompt (chat template + assistant header). A prompt that leaves
    fewer than max_new_tokens positions of the context is a DataError naming its line."""
    ids = [tokenizer.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
    for row, p in zip(rows, ids):
        if len(p) + max_new_tokens > context:
            raise DataError(f"{row['where']}: the prompt is {len(p)} tokens; with max_new_tokens="
                            f"{max_new_tokens} it needs {len(p) + max_new_tokens} positions, more than "
                            f"the model's context of {context}; shorten the prompt or lower max_new_tokens")
    return ids


def fitting_prompts(rows: list[dict], tokenizer, *, context: int, max_new_tokens: int
                    ) -> tuple[list[dict], list[list[int]], int]:
    """(rows, their token ids, how many were left out) for the prompts that leave max_new_tokens
    positions of the context, as `lmschool label` keeps them; none fitting is encode_prompts' error."""
    ids = [tokenizer.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
    keep = [i for i, p in enumerate(ids) if len(p) + max_new_tokens <= context]
    if not keep:
        encode_prompts(rows[:1], tokenizer, context=context, max_new_tokens=max_new_tokens)
    return [rows[i] for i in keep], [ids[i] for i in keep], len(rows) - len(keep)


# ---- a few prompts to show side by side ----------------------------------------------------------
# The report puts every model's answers to SIDE_BY_SIDE eval prompts side by side; pre-training
# answers the same ones at its end (stages/pretrain.py), so the report runs no model.

SIDE_BY_SIDE = 4

_CATEGORY_ORDER = ["refuse", "arithmetic", "fact_town", "smalltalk", "fact_pet", "story"]


def prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def pick_prompts(rows: list[dict], n: int) -> list[dict]:
    """n rows of distinct categories (refusal, sum, fact, small talk first), in a fixed order."""
    firsts: dict[str, dict] = {}
    for row in rows:
        if row.get("prompt") and row.get("category") not in firsts:
            firsts[row.get("category")] = row
    order = sorted(firsts, key=lambda c: (_CATEGORY_ORDER.index(c) if c in _CATEGORY_ORDER else 99, str(c)))
    chosen = [firsts[c] for c in order][:n]
    taken = {prompt_key(r["prompt"]) for r in chosen}
    chosen += [r for r in rows if r.get("prompt") and prompt_key(r["prompt"]) not in taken][:n - len(chosen)]
    return chosen
