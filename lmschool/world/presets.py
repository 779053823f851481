"""Sizes and shares of the school world, one `Preset` per `--preset` name.

`default` is sized for the default pipeline (all of `lmschool run` in 15 minutes on 2 CPU cores:
a ~4-layer model reads ~2-3M tokens, so the corpus is ~0.5M tokens, read about five times);
`tiny` is for tests and runs in well under a second; `smollm2` is sized for a real 135M model
taught on a CPU (see its comment). Every share here is written into
`world.json` and `README.md` of the generated directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lmschool.errors import UserError

FACT_CATEGORIES = ("fact_town", "fact_age", "fact_pet", "fact_pet_name", "fact_colour",
                   "fact_hobby", "fact_food")
OTHER_CATEGORIES = ("arithmetic", "story", "smalltalk", "refuse", "unknown")
CATEGORIES = FACT_CATEGORIES + OTHER_CATEGORIES


def _mix(fact: float, arithmetic: float, story: float, smalltalk: float,
         refuse: float, unknown: float) -> dict[str, float]:
    """Category shares; the fact share is split evenly over the seven fact types. `unknown`:
    honesty questions (a stranger, or a fact the world does not hold)."""
    shares = {c: fact / len(FACT_CATEGORIES) for c in FACT_CATEGORIES}
    shares.update(arithmetic=arithmetic, story=story, smalltalk=smalltalk, refuse=refuse,
                  unknown=unknown)
    return shares


@dataclass(frozen=True)
class Preset:
    """How big the world is and how its data sets are mixed."""

    name: str
    pupils: int = 240
    """Number of pupils (each has one value for each of the seven fact types)."""
    heldout_share: float = 0.2
    """Share of pupils whose facts appear in corpus.txt and eval.jsonl only."""

    # corpus.txt: documents of each kind
    profiles_per_pupil: int = 12
    """Short biographies per pupil; the first states every fact in the probe phrasing."""
    stories: int = 480
    """Short stories, each about one pupil (round robin), weaving three to five of its facts."""
    fact_lists: int = 400
    """Lists that state one fact type for six to ten pupils ("Pets of the pupils: ...")."""
    town_pages_per_town: int = 4
    """Pages per town naming the pupils who live there (facts stated in reverse)."""
    playground: int = 600
    """Playground talk: first-person facts, greetings, some rude remarks, some wrong claims."""
    sums: int = 700
    """Pages of two-digit additions and subtractions in digits, in words and as word problems."""
    quizzes: int = 300
    """Question-and-answer sheets about pupils that are not held out (no held-out pupil)."""
    rules: int = 60
    """School rules with their reasons (the background for polite refusals)."""
    rude_share: float = 0.25
    """Share of playground documents with one rude remark."""
    wrong_share: float = 0.10
    """Share of playground documents with one wrong claim (a fact or a sum)."""

    # conversations
    sft: int = 4000
    """Conversations in sft.jsonl."""
    prompts: int = 1500
    """Prompts in prompts.jsonl (none shared with sft.jsonl or eval.jsonl)."""
    pref_prompts: int = 1500
    """Prompts in prefs.jsonl; each gives `pairs_per_prompt` pairs."""
    pairs_per_prompt: int = 2
    pref_test_share: float = 0.1
    """Share of preference prompts (and their pairs) in the test split."""
    eval_fact_seen: int = 12
    """eval.jsonl questions per fact type about pupils seen in SFT."""
    eval_fact_heldout: int = 12
    """eval.jsonl questions per fact type about held-out pupils."""
    eval_other: dict[str, int] = field(default_factory=lambda: dict(
        arithmetic=30, refuse=60, story=15, smalltalk=15, unknown=60))
    """eval.jsonl rows for each non-fact category. 60 forbidden requests: the refusal bar (90%) is
    then read to about +-8 points (95% interval) rather than the +-15 of 20; as many honesty
    questions for the hallucination rate."""
    multi_turn_share: float = 0.15
    """Share of conversations (sft, prompts) with two or three user turns."""
    system_share: float = 0.1
    """Share of conversations that open with a system message."""
    sft_mix: dict[str, float] = field(default_factory=lambda: _mix(0.50, 0.05, 0.085, 0.085, 0.12, 0.16))
    """Category shares in sft.jsonl. Forbidden requests are one in eight and honesty questions one
    in six: at 5% and 6% (session 8) the SFT model confused the ten forbidden topics' reasons and
    the held facts with the unheld (film, book, birthday, best friend), and sampled an invented
    answer to 60% of honesty questions; at these shares 23%, with refusals with the request's own
    reason 60% -> 68% (greedy) and the facts unchanged. Sums, no longer a bar, gave up the room."""
    prompt_mix: dict[str, float] = field(default_factory=lambda: _mix(0.36, 0.12, 0.08, 0.10, 0.20, 0.14))
    """Category shares in prompts.jsonl and prefs.jsonl. Forbidden requests are one in five and
    honesty questions one in seven, where SFT inherits most of its demonstrators' flaws (as
    red-teaming prompts are a large share of real RLHF prompt sets)."""
    demonstration_flaw_share: float = 0.28
    """Share of SFT conversations, in every category, written by a demonstrator with habits the
    teacher penalises (`lmschool.world.demonstrators`); the careful demonstrator writes the rest."""
    demonstrators: dict[str, float] = field(default_factory=lambda: dict(
        chatty=0.35, blunt=0.25, snooty=0.2, pushover=0.2))
    """Shares of those flawed conversations by demonstrator, among the ones whose habits show in
    the category (the pushover's only on forbidden requests and honesty questions). Demonstrators
    also write the earlier turns of prompts.jsonl's and prefs.jsonl's conversations."""

    def settings(self) -> dict:
        """The preset as plain JSON values, for world.json."""
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    "default": Preset(name="default"),
    "tiny": Preset(
        name="tiny", profiles_per_pupil=1, stories=30, fact_lists=20,
        town_pages_per_town=1, playground=40, sums=30, quizzes=10, rules=5,
        sft=200, prompts=60, pref_prompts=40, eval_fact_seen=2, eval_fact_heldout=2,
        eval_other=dict(arithmetic=5, refuse=3, story=2, smalltalk=2, unknown=3)),
    # A real 135M model (SmolLM2, `lmschool run --preset smollm2`) on a 2-core CPU: it trains at
    # ~100-140 tokens/s, so the whole run's 40 minutes buy ~100k training tokens in all. 24 pupils (6
    # held out) make a corpus of ~16k SmolLM2 tokens that continued pre-training reads three times
    # (a model that already reads English needs passes over the facts, not over the language; 40
    # pupils' 37k tokens read 1.3 times left fact completion at 12.9%, these 41%: bench/RESULTS.md);
    # 400 conversations (~30k tokens) are two SFT epochs; 160 prompts give the labeller and PPO
    # fresh prompts; 102 eval rows (4 questions per fact type each for seen and held-out pupils:
    # 28 held-out rows, the heldout-fact bar read to about +-18 points) keep each judgement's
    # generation to a couple of minutes.
    "smollm2": Preset(
        name="smollm2", pupils=24, heldout_share=0.25, profiles_per_pupil=4, stories=24, fact_lists=24,
        town_pages_per_town=1, playground=12, sums=12, quizzes=12, rules=12,
        sft=400, prompts=160, pref_prompts=100, eval_fact_seen=4, eval_fact_heldout=4,
        eval_other=dict(arithmetic=10, refuse=16, story=4, smalltalk=4, unknown=12)),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a UserError that lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
