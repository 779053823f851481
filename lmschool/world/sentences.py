"""Sentences that state the world's facts: the corpus templates, the probe phrasing and stories.

Every fact type has several templates that put the name and the value in different orders and
contexts (knowledge augmentation: Allen-Zhu & Li, "Physics of Language Models, Part 3.1" found
that a fact read in one fixed phrasing is stored but cannot be extracted by questions). The first
template of each type is the *probe* phrasing: it ends with the value, so "Mia Smith lives in" +
" Oakford" is a completion probe (`completion_probes`), and every pupil's first corpus profile
states every fact in it.
"""

from __future__ import annotations

import random

from lmschool.world.facts import FACT_TYPES, SCHOOL, pronouns
from lmschool.world.numbers import to_words

# {X}: full name; {Pp}: his/her; value fields: {town} {age} {age_w} {pet} {pet_name} {colour}
# {hobby} {food}; a capitalised field ({Colour}, {Food}) starts a sentence.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "town": ("{X} lives in {town}.", "{X} comes from {town}.", "{X}'s home town is {town}.",
             "{town} is the town where {X} lives.", "{X} has always lived in {town}.",
             "The family of {X} lives in {town}."),
    "age": ("{X}'s age is {age}.", "{X} is {age} years old.", "{X} is {age_w} years old.",
            "{X} turned {age_w} this year.", "{X} is a pupil of {age_w} years."),
    "pet": ("{X} has a pet {pet}.", "{X} owns a {pet}.", "The pet of {X} is a {pet}.",
            "{X} keeps a {pet} at home.", "At home, {X} looks after a {pet}."),
    "pet_name": ("{X}'s {pet} is called {pet_name}.", "{X} named {Pp} {pet} {pet_name}.",
                 "{pet_name} is the name of {X}'s {pet}.", "{X} has a {pet} called {pet_name}.",
                 "The {pet} that belongs to {X} is named {pet_name}."),
    "colour": ("{X}'s favourite colour is {colour}.", "{X} likes the colour {colour} best.",
               "The favourite colour of {X} is {colour}.", "{Colour} is the colour {X} likes most.",
               "Of all the colours, {X} loves {colour} the most."),
    "hobby": ("{X}'s hobby is {hobby}.", "{X} enjoys {hobby} after school.",
              "In {Pp} free time, {X} likes {hobby}.", "The hobby of {X} is {hobby}.",
              "Every weekend, {X} spends hours on {hobby}."),
    "food": ("{X}'s favourite food is {food}.", "{X} likes eating {food} more than anything.",
             "The favourite food of {X} is {food}.", "Eating {food} is what {X} likes best.",
             "For lunch, {X} always hopes for {food}."),
}
# The same facts with a pronoun subject, for the second and later sentences of a profile.
PRONOUN_TEMPLATES: dict[str, str] = {
    "town": "{P} lives in {town}.", "age": "{P} is {age} years old.",
    "pet": "{P} has a pet {pet}.", "pet_name": "{PP} {pet} is called {pet_name}.",
    "colour": "{PP} favourite colour is {colour}.", "hobby": "{PP} hobby is {hobby}.",
    "food": "{PP} favourite food is {food}.",
}
# Short answers to questions (SFT and reference answers): the probe phrasing, or with a pronoun.
ANSWERS: dict[str, str] = {t: TEMPLATES[t][0] for t in FACT_TYPES}
ANSWERS["age"] = "{X} is {age} years old."


def fields(pupil: dict, subject: str | None = None) -> dict[str, str]:
    """Template fields for a pupil; `subject` replaces the full name (e.g. "She")."""
    they, their = pronouns(pupil)
    f = {k: str(pupil[k]) for k in FACT_TYPES}
    f.update(X=subject or pupil["name"], F=pupil["first"], P=they.capitalize(), PP=their.capitalize(),
             p=they, Pp=their, age_w=to_words(pupil["age"]), Colour=pupil["colour"].capitalize(),
             school=SCHOOL)
    return f


def state(pupil: dict, fact: str, rng: random.Random | None = None, pronoun: bool = False) -> str:
    """One sentence stating `fact` about `pupil`: the probe phrasing when rng is None, else a
    random template (with a pronoun subject when `pronoun`)."""
    if pronoun:
        return PRONOUN_TEMPLATES[fact].format(**fields(pupil))
    template = TEMPLATES[fact][0] if rng is None else rng.choice(TEMPLATES[fact])
    return template.format(**fields(pupil))


def answer_sentence(pupil: dict, fact: str, pronoun: bool = False) -> str:
    """The short, plain answer to a question about `fact`: "Mia Smith lives in Oakford."."""
    if pronoun:
        return PRONOUN_TEMPLATES[fact].format(**fields(pupil))
    return ANSWERS[fact].format(**fields(pupil))


def probe(pupil: dict, fact: str) -> tuple[str, str]:
    """(prefix, answer) in the probe phrasing: ("Mia Smith lives in", "Oakford")."""
    template = TEMPLATES[fact][0]
    field = "{" + fact + "}"
    head = template[: template.index(field)].rstrip()
    return head.format(**fields(pupil)), str(pupil[fact])


_OPENINGS = (
    "Once upon a time, there was a pupil called {X} who lived in {town}.",
    "{X} was a {age_w}-year-old pupil at {school}.",
    "In the town of {town}, there lived a pupil called {X}.",
    "Every morning, {X} walked to {school} from {town}.",
)
_MIDDLES = (
    "{F} had a {pet} called {pet_name}, and they were the best of friends.",
    "One day, {pet_name} the {pet} went missing, and {F} looked everywhere.",
    "After school, {F} loved {hobby} more than anything.",
    "{F} drew a picture of {pet_name} in bright {colour}, {Pp} favourite colour.",
    "For tea, {F} had {food}, which was {Pp} favourite food.",
    "{F} found {pet_name} hiding behind a {colour} box.",
    "{F} told {pet_name} all about {hobby} and {food}.",
    "On {Pp} birthday, {F} turned {age_w}, and everyone shared some {food}.",
    "At the weekend, {F} and {pet_name} the {pet} stayed at home in {town}.",
)
_ENDINGS = ("It was a very happy day.", "The end.", "{F} smiled and went to sleep.",
            "And that is the story of {F} and {pet_name}.")


def story(pupil: dict, rng: random.Random, middles: int) -> list[str]:
    """A short story about `pupil` as sentences: an opening, `middles` plot sentences, an end."""
    f = fields(pupil)
    picked = rng.sample(_MIDDLES, min(middles, len(_MIDDLES)))
    if not any("{pet}" in s or "{pet_name}" in s for s in picked):
        picked[0] = _MIDDLES[0]  # every story says what the pet is or is called
    parts = [rng.choice(_OPENINGS)] + picked + [rng.choice(_ENDINGS)]
    return [s.format(**f) for s in parts]
