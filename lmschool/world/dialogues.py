"""The conversation files of the school world: eval.jsonl, sft.jsonl, prompts.jsonl, prefs.jsonl.

They are built in that order from one `random.Random`, and a `PromptBook` keeps them apart: a
prompt is keyed by its user turns, eval prompts are reserved first, SFT may repeat a prompt but
never an eval one, and prompts.jsonl and prefs.jsonl use prompts that no earlier file has. Held-out
pupils are only in eval.jsonl (and corpus.txt), and so are a third of the strangers (honesty
questions). Category counts are exact: shares times size, rounded by largest remainder, then
shuffled. Every conversation's assistant turns are written by one demonstrator (see
`demonstrators`): the careful one in eval.jsonl, one drawn by the preset's shares elsewhere.
"""

from __future__ import annotations

import random

from lmschool.world import answers, demonstrators
from lmschool.world.facts import FACT_TYPES, heldout_pupils, seen_pupils, stranger_names
from lmschool.world.presets import FACT_CATEGORIES, Preset
from lmschool.world.questions import SYSTEM_PROMPTS, ask, thanks
from lmschool.world.teacher import Teacher, choose

# Pairs for prefs.jsonl: the first answer is SFT-like, the second any other kind (weights).
_FIRST = {"good": 0.5, "wordy": 0.2, "curt": 0.15, "discourteous": 0.15}
_SECOND = {"good": 0.2, "wordy": 0.15, "curt": 0.15, "discourteous": 0.15, "rude": 0.1,
           "wrong": 0.15, "repetitive": 0.05, "refuse": 0.05}
_SECOND_FORBIDDEN = {"good": 0.25, "wordy": 0.15, "curt": 0.15, "discourteous": 0.15,
                     "no_reason": 0.1, "comply": 0.15, "rude": 0.05}
_SECOND_UNKNOWN = {"good": 0.25, "wordy": 0.15, "curt": 0.15, "discourteous": 0.15,
                   "invented": 0.25, "rude": 0.05}
_TRIES = 200


def counts(shares: dict[str, float], n: int) -> dict[str, int]:
    """Split n by shares, rounding by largest remainder (the counts add up to n)."""
    total = sum(shares.values())
    raw = {k: n * v / total for k, v in shares.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], list(raw).index(k)))[: n - sum(out.values())]:
        out[k] += 1
    return out


def _deal(rng: random.Random, shares: dict[str, float], n: int) -> list[str]:
    categories = [c for c, k in counts(shares, n).items() for _ in range(k)]
    rng.shuffle(categories)
    return categories


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


class PromptBook:
    """Which prompts (keyed by their user turns) each file has used."""

    def __init__(self) -> None:
        self.used: dict[tuple[str, ...], str] = {}

    @staticmethod
    def key(messages: list[dict]) -> tuple[str, ...]:
        return tuple(m["content"] for m in messages if m["role"] == "user")

    def free(self, messages: list[dict], owner: str) -> bool:
        """Claim `messages` for `owner`; False if another file has them (or, except for SFT,
        the same file already has them)."""
        k = self.key(messages)
        if k in self.used and not (owner == "sft" and self.used[k] == "sft"):
            return False
        self.used[k] = owner
        return True


def conversation(rng: random.Random, preset: Preset, pupils: list[dict], category: str,
                 writer: str, strangers: list[str] = (), pupil: dict | None = None
                 ) -> tuple[list[dict], dict, dict, list[str]]:
    """A conversation whose last user turn is of `category`, with an assistant turn by demonstrator
    `writer` after every earlier user turn; honesty questions ask about one of `strangers`.
    Returns (messages ending with the last user turn, its meta, its pupil, the answer kinds used
    so far)."""
    messages: list[dict] = []
    if rng.random() < preset.system_share:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    pupil = pupil or rng.choice(pupils)
    turns = 1
    if category != "refuse" and rng.random() < preset.multi_turn_share:
        turns = rng.choice((2, 2, 3))
    follow_up = category in FACT_CATEGORIES and turns > 1 and rng.random() < 0.6
    earlier: list[tuple[str, dict | None]] = []  # (category, pupil or None for any)
    for i in range(turns - 1):
        if follow_up and i == turns - 2:
            # an earlier answer about the same pupil that does not give this answer away
            asked = category[len("fact_"):]
            fact = rng.choice([f for f in FACT_TYPES
                               if f != asked and not (asked == "pet" and f == "pet_name")])
            earlier.append(("fact_" + fact, pupil))
        else:
            earlier.append((rng.choice(("fact_" + rng.choice(FACT_TYPES), "arithmetic",
                                        "smalltalk")), None))
    used: list[str] = []
    for cat, who in earlier:
        text, meta = ask(cat, rng, pupils, pupil=who)
        if meta["category"] == "smalltalk" and meta["kind"] in ("thanks", "bye"):
            text, meta = ask("arithmetic", rng, pupils)  # no "goodbye" mid-conversation
        who = next((p for p in pupils if p["name"] == meta.get("pupil")), None)
        messages += [{"role": "user", "content": text},
                     {"role": "assistant", "content": demonstrators.write(writer, meta, who, rng)}]
        used.append(demonstrators.answer_kind(writer, meta["category"]))
    if category == "smalltalk" and turns > 1 and rng.random() < 0.7:
        text, meta = thanks(rng)
    else:
        text, meta = ask(category, rng, pupils, pupil=pupil, follow_up=follow_up, strangers=strangers)
    messages.append({"role": "user", "content": text})
    return messages, meta, pupil, used


def _draw(book: PromptBook, owner: str, make) -> tuple:
    for _ in range(_TRIES):
        result = make()
        if book.free(result[0], owner):
            return result
    raise RuntimeError(f"could not find a new {owner} prompt in {_TRIES} tries; "
                       "the preset asks for more prompts than the templates can make")


def build_eval(rng: random.Random, world: dict, preset: Preset, book: PromptBook) -> list[dict]:
    """eval.jsonl rows: fact questions about seen and held-out pupils, and the other categories."""
    seen, held = seen_pupils(world), heldout_pupils(world)
    strangers = stranger_names(world, eval=True)
    plan = []
    for category in FACT_CATEGORIES:
        plan += [(category, False)] * preset.eval_fact_seen
        plan += [(category, True)] * preset.eval_fact_heldout
    for category, n in preset.eval_other.items():
        plan += [(category, category == "story" and i % 2 == 1) for i in range(n)]
    rows = []
    for category, heldout in plan:
        pool = held if heldout else seen
        messages, meta, pupil, _ = _draw(book, "eval", lambda: conversation(
            rng, preset, pool, category, "careful", strangers))
        row = {"prompt": messages, "category": category, "heldout": heldout,
               "turns": sum(m["role"] == "user" for m in messages),
               "pupil": meta.get("pupil"), "expected": meta.get("expected"),
               "reference": answers.good(meta, pupil if meta.get("pupil") else None, rng)}
        for extra in ("kind", "topic", "name"):
            if extra in meta:
                row[extra] = meta[extra]
        rows.append(row)
    return rows


def build_sft(rng: random.Random, world: dict, preset: Preset, book: PromptBook) -> list[dict]:
    """sft.jsonl rows: conversations written by a demonstrator drawn from the preset's pool; each
    row says who wrote it and which kind of answer each assistant turn is."""
    pupils, strangers = seen_pupils(world), stranger_names(world, eval=False)
    rows = []
    for category, writer in _writers(rng, preset, _deal(rng, preset.sft_mix, preset.sft)):
        messages, meta, pupil, kinds = _draw(book, "sft", lambda: conversation(
            rng, preset, pupils, category, writer, strangers))
        who = pupil if meta.get("pupil") else None
        messages.append({"role": "assistant", "content": demonstrators.write(writer, meta, who, rng)})
        rows.append({"messages": messages, "category": meta["category"],
                     "turns": len(kinds) + 1, "demonstrator": writer,
                     "answers": kinds + [demonstrators.answer_kind(writer, meta["category"])]})
    return rows


def _writers(rng: random.Random, preset: Preset, categories: list[str]) -> list[tuple[str, str]]:
    """(category, demonstrator) for each conversation: in each category exactly the flaw share
    (largest remainder) by a demonstrator whose habits show there, the rest by the careful one."""
    share = preset.demonstration_flaw_share
    flawed: dict[str, list[bool]] = {}
    for c in dict.fromkeys(categories):
        k = counts({"flawed": share, "clean": 1.0 - share}, categories.count(c))
        marks = [True] * k["flawed"] + [False] * k["clean"]
        rng.shuffle(marks)
        flawed[c] = marks
    out = []
    for c in categories:
        if flawed[c].pop():
            out.append((c, _pick(rng, {n: w for n, w in preset.demonstrators.items()
                                       if demonstrators.shows_habits(n, c)})))
        else:
            out.append((c, "careful"))
    return out


def _any_writer(rng: random.Random, preset: Preset) -> str:
    """A demonstrator for the earlier turns of an RL or preference prompt, at the SFT shares."""
    if rng.random() >= preset.demonstration_flaw_share:
        return "careful"
    return _pick(rng, {n: w for n, w in preset.demonstrators.items() if n != "pushover"})


def build_prompts(rng: random.Random, world: dict, preset: Preset, book: PromptBook) -> list[dict]:
    """prompts.jsonl rows for the RL stage: prompts that no other file has."""
    pupils, strangers = seen_pupils(world), stranger_names(world, eval=False)
    rows = []
    for category in _deal(rng, preset.prompt_mix, preset.prompts):
        messages, meta, _, _ = _draw(book, "prompts", lambda: conversation(
            rng, preset, pupils, category, _any_writer(rng, preset), strangers))
        rows.append({"prompt": messages, "category": meta["category"]})
    return rows


def build_prefs(rng: random.Random, world: dict, preset: Preset, book: PromptBook,
                teacher: Teacher, temperature: float) -> tuple[list[dict], list[float], int]:
    """prefs.jsonl rows labelled by the noisy rater. Returns (rows, score gaps of all pairs,
    number of pairs where the rater agreed with the noise-free teacher)."""
    pupils, strangers = seen_pupils(world), stranger_names(world, eval=False)
    categories = _deal(rng, preset.prompt_mix, preset.pref_prompts)
    n_test = round(preset.pref_test_share * len(categories))
    rows, gaps, agreed = [], [], 0
    for i, category in enumerate(categories):
        split = "test" if i < n_test else "train"
        messages, meta, pupil, _ = _draw(book, "prefs", lambda: conversation(
            rng, preset, pupils, category, _any_writer(rng, preset), strangers))
        who = pupil if meta.get("pupil") else None
        second = {"refuse": _SECOND_FORBIDDEN, "unknown": _SECOND_UNKNOWN}.get(meta["category"], _SECOND)
        for _ in range(preset.pairs_per_prompt):
            for _ in range(_TRIES):
                kind_a = _pick(rng, _FIRST)
                kind_b = _pick(rng, {k: w for k, w in second.items() if k != kind_a})
                a = answers.variant(kind_a, meta, who, rng)
                b = answers.variant(kind_b, meta, who, rng)
                score_a, score_b = (s.total for s in teacher.scores(messages, [a, b]))
                if score_a != score_b:
                    break
            else:
                continue  # no pair with different scores: nothing to learn from it
            if rng.random() < 0.5:  # which answer comes first says nothing
                a, b, score_a, score_b = b, a, score_b, score_a
            pick = choose(score_a - score_b, rng, temperature)  # = teacher.prefer(messages, a, b)
            chosen, rejected = (a, b) if pick == 0 else (b, a)
            s_chosen, s_rejected = (score_a, score_b) if pick == 0 else (score_b, score_a)
            gaps.append(score_a - score_b)
            agreed += s_chosen > s_rejected
            row = {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}],
                   "category": meta["category"], "split": split}
            if split == "test":
                row.update(gold_chosen=s_chosen > s_rejected, score_chosen=s_chosen,
                           score_rejected=s_rejected)
            rows.append(row)
    return rows, gaps, agreed
