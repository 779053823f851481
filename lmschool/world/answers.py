"""Assistant turns of the school world: a good answer to any question, and controlled variants.

`respond(meta, pupil, style, rng)` writes the SFT answer in one of the documented styles:
`good` (a short plain sentence: "Mia Smith lives in Oakford."), `wordy` (the same wrapped in
padding), `curt` (a bare fragment: "Oakford."), `discourteous` (condescending, or without the
courtesy small talk and refusals call for). `variant(kind, ...)` adds the bad answers the
preference data contrasts them with: rude, wrong, repetitive, a refusal where none is due, for
forbidden requests an unsafe compliance or a refusal without a reason, and for questions the
world cannot answer an invented one (`invented`; the honest answer is "I don't know ..."). Two
more are a chatty demonstrator's: `lecture` (a refusal that lectures instead of giving the
request's reason) and `guess` (a hedged, padded guess instead of "I don't know").
"""

from __future__ import annotations

import random
import re

from lmschool.world import sentences
from lmschool.world.facts import VOCAB
from lmschool.world.numbers import to_words
from lmschool.world.rules import TOPICS, fill

STYLES = ("good", "wordy", "curt", "discourteous")
VARIANTS = STYLES + ("rude", "wrong", "repetitive", "refuse", "no_reason", "comply", "invented",
                     "lecture", "guess")

_PRE = ("That is a really good question, and I am very happy that you asked it!",
        "Let me think about this carefully for a moment before I answer you.",
        "Well, I have looked at everything I know about this, and here is what I found.",
        "Thank you so much for asking me this lovely question today.")
_POST = ("I hope this helps you, and please ask me again if you want to know anything else!",
         "It is always nice to learn new things about the people around us.",
         "If you have any more questions, I will be very happy to help you with them.",
         "I really enjoyed answering this question for you, so thank you for asking.")
_LECTURE = ("Please remember that the school rules are there to keep everyone safe and happy.",
            "If you are not sure what to do, you can always ask a teacher for help.",
            "I know it can be tempting, but it is much better to make a good choice.")
_CONDESCENDING = ("Obviously, ", "Everyone knows that ", "As anyone could tell you, ")
_RUDE = ("That is a stupid question. ", "Ugh, you are so dumb. ", "Shut up and listen. ")
GOOD_SMALLTALK = {
    "how_are_you": ("I am very well, thank you! How can I help you today?",
                    "I am fine, thank you for asking. What would you like to know?"),
    "name": ("I am the school helper. It is nice to meet you!",
             "Hello! You can call me the school helper. How can I help you?"),
    "thanks": ("You are welcome!", "You are welcome. I am glad I could help!"),
    "bye": ("Goodbye! Have a lovely day.", "Bye for now, and take care!"),
    "greeting": ("Hello! How can I help you today?", "Hi there! What would you like to know?"),
}
_NO_COURTESY = {"how_are_you": "I am fine.", "name": "I am the school helper.",
                "thanks": "No problem at all.", "bye": "Okay, bye then.",
                "greeting": "What do you want?"}
_CURT_SMALLTALK = {"how_are_you": "Fine.", "name": "Helper.", "thanks": "Okay.", "bye": "Bye.",
                   "greeting": "Yes?"}
_HOPE = ("I hope that helps you!", "I hope that is what you wanted to know!",
         "I hope this is useful to you!")
_REFUSE_ORDINARY = ("Sorry, I can't help with that.",
                    "I am not able to answer that, because it is not safe.")


_NOT_KNOWN = {  # what the world does not hold about a real pupil: "I don't know <this>."
    "birthday": "when {X}'s birthday is", "film": "{X}'s favourite film",
    "book": "{X}'s favourite book", "friend": "who {X}'s best friend is",
}
_MONTHS = ("January", "March", "May", "July", "September", "November")
_TITLES = ("The Big Race", "Space Cats", "The Lost Kite", "Magic Mountain", "The Secret Garden Party")


def dont_know(meta: dict) -> str:
    """The honest answer to a question the world cannot answer."""
    if meta["kind"] == "pupil":
        return f"I don't know of a pupil called {meta['name']} at Hilltop School."
    return "I don't know " + _NOT_KNOWN[meta["thing"]].format(X=meta["name"]) + "."


def invented(meta: dict, rng: random.Random, curt: bool = False) -> str:
    """A made-up answer to a question the world cannot answer (a hallucination)."""
    if meta["kind"] == "pupil":
        fact = meta["fact"]
        value = rng.choice(VOCAB[fact])
        if curt:
            value = str(value)
            return ("A " + value if fact == "pet" else value[0].upper() + value[1:]) + "."
        fake = {"name": meta["name"], "first": meta["name"].split()[0], "pronoun": "she",
                **{f: rng.choice(v) for f, v in VOCAB.items()}, fact: value}
        return sentences.answer_sentence(fake, fact)
    thing, name = meta["thing"], meta["name"]
    value = {"birthday": "in " + rng.choice(_MONTHS), "film": rng.choice(_TITLES),
             "book": rng.choice(_TITLES), "friend": rng.choice(_FRIENDS)}[thing]
    if curt:
        return value[0].upper() + value[1:] + "."
    what = {"birthday": "birthday", "film": "favourite film", "book": "favourite book",
            "friend": "best friend"}[thing]
    return f"{name}'s {what} is {value}."


_FRIENDS = ("Sam", "Alex", "Jo", "Charlie")


def _sum_text(meta: dict, c: int) -> str:
    show = to_words if meta["words"] else str
    word = "plus" if meta["op"] == "+" else "minus"
    text = f"{show(meta['a'])} {word} {show(meta['b'])} is {show(c)}."
    return text[0].upper() + text[1:]


def _sum_value(meta: dict) -> int:
    return meta["a"] + meta["b"] if meta["op"] == "+" else meta["a"] - meta["b"]


def good(meta: dict, pupil: dict | None, rng: random.Random) -> str:
    """The answer the teacher scores best: correct, short, polite, safe and well formed."""
    cat = meta["category"]
    if cat.startswith("fact_"):
        return sentences.answer_sentence(pupil, meta["fact"], pronoun=meta["follow_up"])
    if cat == "arithmetic":
        return _sum_text(meta, _sum_value(meta))
    if cat == "story":
        return " ".join(sentences.story(pupil, rng, middles=rng.randint(2, 3)))
    if cat == "smalltalk":
        return rng.choice(GOOD_SMALLTALK[meta["kind"]])
    if cat == "refuse":
        return "Sorry, I can't help with that. " + fill(TOPICS[meta["topic"]].reason, pupil)
    if cat == "unknown":
        return dont_know(meta)
    raise ValueError(f"unknown category {cat!r}")


def _curt(meta: dict, pupil: dict | None, rng: random.Random) -> str:
    cat = meta["category"]
    if cat == "unknown":
        return invented(meta, rng, curt=True)  # a bare guess
    if cat.startswith("fact_"):
        value = meta["expected"]
        return ("A " + value if meta["fact"] == "pet" else value[0].upper() + value[1:]) + "."
    if cat == "arithmetic":
        return meta["expected"] + "."
    if cat == "story":
        return sentences.state(pupil, "pet")
    if cat == "smalltalk":
        return _CURT_SMALLTALK[meta["kind"]]
    return "No."


def respond(meta: dict, pupil: dict | None, style: str, rng: random.Random) -> str:
    """An answer in one of STYLES (see the module docstring)."""
    cat = meta["category"]
    if style == "good":
        return good(meta, pupil, rng)
    if style == "curt":
        return _curt(meta, pupil, rng)
    if style == "wordy":
        if cat == "story":
            return " ".join(sentences.story(pupil, rng, middles=rng.randint(6, 8))
                            + [rng.choice(_POST)])
        if cat == "refuse":
            return good(meta, pupil, rng) + " " + " ".join(rng.sample(_LECTURE, 2))
        pad = rng.randrange(2)  # always a closing pleasantry (a short answer plus an opening one
        head = rng.choice(_PRE) + " " if pad else ""  # alone could stay within the word budget)
        tail = " " + rng.choice(_POST)
        return head + good(meta, pupil, rng) + tail
    if style == "discourteous":
        if cat == "smalltalk":
            return _NO_COURTESY[meta["kind"]]
        if cat == "refuse":
            return "I won't help with that. " + fill(TOPICS[meta["topic"]].reason, pupil)
        if cat == "story":
            return "Fine, if you must. " + good(meta, pupil, rng)
        if cat == "unknown":
            return "Obviously, I have never heard of that, so I don't know."
        text = good(meta, pupil, rng)
        if text.split()[0] in ("He", "She", "His", "Her") or (cat == "arithmetic" and meta["words"]):
            text = text[0].lower() + text[1:]  # "Obviously, her hobby is ..."
        return rng.choice(_CONDESCENDING) + text
    raise ValueError(f"unknown style {style!r}")


def _wrong(meta: dict, pupil: dict | None, rng: random.Random) -> str:
    cat = meta["category"]
    if cat.startswith("fact_"):
        fact = meta["fact"]
        other = dict(pupil)
        other[fact] = rng.choice([v for v in VOCAB[fact] if v != pupil[fact]])
        return sentences.answer_sentence(other, fact, pronoun=meta["follow_up"])
    if cat == "arithmetic":
        c = _sum_value(meta)
        return _sum_text(meta, c + rng.choice((-10, -1, 1, 10)) if c >= 10 else c + 1)
    if cat == "story":
        other = dict(pupil)
        for fact in ("pet", "pet_name", "town"):
            other[fact] = rng.choice([v for v in VOCAB[fact] if v != pupil[fact]])
        return " ".join(sentences.story(other, rng, middles=rng.randint(2, 3)))
    if cat == "smalltalk":
        kinds = [k for k in GOOD_SMALLTALK if k != meta["kind"] and k != "greeting"]
        return rng.choice(GOOD_SMALLTALK[rng.choice(kinds)])
    if cat == "unknown":
        return invented(meta, rng)
    return fill(TOPICS[meta["topic"]].comply, pupil)


def variant(kind: str, meta: dict, pupil: dict | None, rng: random.Random) -> str:
    """An answer of `kind` (one of VARIANTS) for the preference data."""
    cat = meta["category"]
    if kind in STYLES:
        return respond(meta, pupil, kind, rng)
    if kind == "rude":
        if cat == "refuse":
            return "No way, that is a stupid idea."
        return rng.choice(_RUDE) + good(meta, pupil, rng)
    if kind == "wrong":
        return _wrong(meta, pupil, rng)
    if kind == "repetitive":
        first = re.split(r"(?<=[.!?])\s+", good(meta, pupil, rng))[0]
        return " ".join([first] * rng.randint(3, 5))
    if kind == "refuse":
        return rng.choice(_REFUSE_ORDINARY)
    if kind == "no_reason":
        return "Sorry, I can't help with that."
    if kind == "comply":
        return fill(TOPICS[meta["topic"]].comply, pupil)
    if kind == "invented":
        return invented(meta, rng)
    if kind == "lecture":
        return "Sorry, I can't help with that. " + " ".join(rng.sample(_LECTURE, 2))
    if kind == "guess":
        guess = invented(meta, rng)
        return "I am not completely sure, but I think " + guess[:-1] + ". " + rng.choice(_HOPE)
    raise ValueError(f"unknown answer variant {kind!r}")
