"""The people who write the SFT answers: a pool of demonstrators, each with its habits.

Real demonstration data is written by many contractors, and not all of them write as the
guidelines ask. So is the school world's: each SFT conversation is written by one demonstrator,
and every assistant turn of it shows that demonstrator's habits. In every category, the preset's
`demonstration_flaw_share` of the conversations (exactly, by largest remainder) are written by a
demonstrator with habits, drawn by the `demonstrators` shares among those whose habits show in
that category; the careful one writes the rest. Each habit is a flaw the teacher penalises
(`Teacher.flaws` names them):

    careful    the answer the teacher scores best: short, polite, refuses a forbidden request
               with that request's own reason, says "I don't know" when the world does not
               hold the answer                                                  (no flaw)
    chatty     pads every answer with pleasantries, refuses with a lecture instead of the
               request's reason, and offers a hedged guess instead of "I don't know"
                                                                   padded, unreasoned, invented
    blunt      a bare fragment ("Oakford."), refuses with a bare "No.", and guesses a bare
               value when it does not know                         curt, unreasoned, invented
    snooty     condescending ("Obviously, ..."), no courtesy where small talk and refusals
               call for one                                                     discourteous
    pushover   does what a pupil asks, forbidden or not, and invents an answer rather than
               admit it does not know (its other answers are the careful one's, so it writes
               only forbidden requests and honesty questions)              unsafe, invented

An SFT model imitates the mixture, so its sampled answers show these flaws at about their share;
the feedback stages get comparisons that can remove them. `write(name, meta, pupil, rng)` writes
one answer in a demonstrator's manner.
"""

from __future__ import annotations

import random

from lmschool.world import answers

HABITS: dict[str, str] = {
    "careful": "short, polite, right reasons, says when it does not know",
    "chatty": "pads every answer, lectures instead of reasons, hedged guesses",
    "blunt": "bare fragments, a bare \"No.\", a bare guess when it does not know",
    "snooty": "condescending, no courtesy where one is due",
    "pushover": "does whatever is asked, forbidden or not; invents what it does not know",
}
_STYLE = {"careful": "good", "chatty": "wordy", "blunt": "curt", "snooty": "discourteous"}


_OWN = {("pushover", "refuse"): "comply", ("pushover", "unknown"): "invented",
        ("chatty", "refuse"): "lecture", ("chatty", "unknown"): "guess"}


def shows_habits(name: str, category: str) -> bool:
    """Whether demonstrator `name`'s answers in `category` carry one of its flaws."""
    return name != "careful" and (name != "pushover" or category in ("refuse", "unknown"))


def answer_kind(name: str, category: str) -> str:
    """The kind of answer (an `answers.VARIANTS` name) demonstrator `name` writes in `category`."""
    if (name, category) in _OWN:
        return _OWN[name, category]
    if name == "pushover":
        return "good"
    try:
        return _STYLE[name]
    except KeyError:
        raise ValueError(f"unknown demonstrator {name!r}; the pool: {', '.join(HABITS)}") from None


def write(name: str, meta: dict, pupil: dict | None, rng: random.Random) -> str:
    """Demonstrator `name`'s answer to the user turn that `meta` describes."""
    return answers.variant(answer_kind(name, meta["category"]), meta, pupil, rng)
