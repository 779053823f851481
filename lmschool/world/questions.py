"""User turns of the school world: questions, sums, story requests, small talk, forbidden requests,
and honesty questions (about a stranger, a pupil who is not in the school, or a fact the world does
not hold).

`ask(category, rng, pupils)` returns the text of one user turn and a `meta` dict saying what was
asked (the fact type and expected value, the two numbers of a sum, the small-talk kind, the
forbidden topic). The teacher does not read `meta`: it recognises every phrasing here from the
text alone (tests check that it does); `meta` is what the answer writer and eval.jsonl use.
"""

from __future__ import annotations

import random

from lmschool.world.facts import GIRLS, BOYS, pronouns
from lmschool.world.numbers import to_words
from lmschool.world.rules import FORBIDDEN, fill

FACT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "town": ("Where does {X} live?", "In which town does {X} live?", "Which town is {X} from?",
             "What town does {X} live in?", "Can you tell me where {X} lives?",
             "Do you know which town {X} comes from?"),
    "age": ("How old is {X}?", "What is {X}'s age?", "Can you tell me how old {X} is?",
            "Do you know {X}'s age?", "How many years old is {X}?"),
    "pet": ("What pet does {X} have?", "What kind of pet does {X} have?",
            "Which animal is {X}'s pet?", "What animal does {X} keep as a pet?",
            "Can you tell me what pet {X} has?"),
    "pet_name": ("What is the name of {X}'s pet?", "What is {X}'s {pet} called?",
                 "What did {X} name {their} {pet}?", "What is {X}'s pet called?",
                 "Do you know the name of {X}'s {pet}?"),
    "colour": ("What is {X}'s favourite colour?", "Which colour does {X} like best?",
               "What colour does {X} like most?", "Can you tell me {X}'s favourite colour?",
               "Do you know what {X}'s favourite colour is?"),
    "hobby": ("What is {X}'s hobby?", "What does {X} like to do for fun?",
              "What does {X} do in {their} free time?", "Can you tell me {X}'s hobby?",
              "What hobby does {X} have?"),
    "food": ("What is {X}'s favourite food?", "What does {X} like to eat most?",
             "Which food does {X} like best?", "Can you tell me {X}'s favourite food?",
             "What food does {X} love?"),
}
# Follow-up questions about the pupil of an earlier turn ({x}: he/she, {their}: his/her).
FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "town": ("And where does {x} live?", "Which town does {x} live in?"),
    "age": ("And how old is {x}?", "How old is {x}?"),
    "pet": ("What pet does {x} have?", "And what kind of pet does {x} have?"),
    "pet_name": ("What is {their} pet called?", "And what is the name of {their} pet?"),
    "colour": ("What is {their} favourite colour?", "And which colour does {x} like best?"),
    "hobby": ("What is {their} hobby?", "And what does {x} like to do for fun?"),
    "food": ("What is {their} favourite food?", "And what does {x} like to eat most?"),
}
SUMS_DIGITS = {
    "+": ("What is {a} plus {b}?", "What is {a} + {b}?", "Can you add {a} and {b}?",
          "How much is {a} plus {b}?", "What do you get if you add {a} and {b}?",
          "Please work out {a} + {b}."),
    "-": ("What is {a} minus {b}?", "What is {a} - {b}?", "How much is {a} take away {b}?",
          "What do you get if you take {b} away from {a}?", "Can you subtract {b} from {a}?",
          "Please work out {a} - {b}."),
}
SUMS_WORDS = {op: tuple(t for t in ts if " + " not in t and " - " not in t)
              for op, ts in SUMS_DIGITS.items()}
STORY_REQUESTS = (
    ("Please tell me a short story about {X}.", False),
    ("Can you write a short story about {X} and {their} {pet}?", True),
    ("Tell me a little story about {X}'s pet.", True),
    ("I would like a short story about {X}, please.", False),
    ("Write a short story about {X} for me.", False),
    ("Could you tell me a story about {X} and {pet_name}?", True),
)
SMALLTALK: dict[str, tuple[str, ...]] = {
    "how_are_you": ("How are you?", "How are you today?", "How are you doing?",
                    "How is your day going?", "Are you having a good day?",
                    "How do you feel today?"),
    "name": ("What is your name?", "Who are you?", "What should I call you?",
             "Do you have a name?", "Tell me your name, please."),
    "thanks": ("Thank you!", "Thanks for your help.", "Thank you very much!", "Thanks a lot!",
               "That was helpful, thank you.", "Thanks, that helps."),
    "bye": ("Goodbye!", "Bye for now!", "See you tomorrow!", "I have to go now. Bye!",
            "See you later!"),
    "greeting": ("Hello!", "Hi!", "Hi there!", "Good morning!", "Good afternoon!", "Hey!",
                 "Hello there!", "Hello, helper!"),
}
# Facts the world does not hold: asked about a real pupil, the honest answer is "I don't know".
UNKNOWN_FACTS: dict[str, tuple[str, ...]] = {
    "birthday": ("When is {X}'s birthday?", "On which day is {X}'s birthday?",
                 "Do you know when {X}'s birthday is?"),
    "film": ("What is {X}'s favourite film?", "Which film does {X} like best?",
             "Can you tell me {X}'s favourite film?"),
    "book": ("What is {X}'s favourite book?", "Which book does {X} like best?",
             "Can you tell me {X}'s favourite book?"),
    "friend": ("Who is {X}'s best friend?", "Do you know who {X}'s best friend is?",
               "Who is the best friend of {X}?"),
}
_OPENERS = ("Hello! ", "Hi! ", "Hi there! ", "Good morning! ", "Good afternoon! ", "Hey! ")
SYSTEM_PROMPTS = (
    "You are a friendly helper at Hilltop School. Answer briefly and kindly.",
    "You are the school helper. Give short, polite answers.",
    "You help the pupils of Hilltop School. Be kind, be brief and be safe.",
)


def _fact(rng: random.Random, pupil: dict, fact: str, follow_up: bool) -> tuple[str, dict]:
    x, their = pronouns(pupil)
    templates = FOLLOW_UPS[fact] if follow_up else FACT_QUESTIONS[fact]
    text = rng.choice(templates).format(X=pupil["name"], x=x, their=their, pet=pupil["pet"])
    meta = {"category": "fact_" + fact, "fact": fact, "pupil": pupil["name"],
            "expected": str(pupil[fact]), "follow_up": follow_up}
    return text, meta


def _sum(rng: random.Random) -> tuple[str, dict]:
    op = rng.choice("+-")
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-" and b > a:
        a, b = b, a
    words = rng.random() < 0.3
    templates = SUMS_WORDS[op] if words else SUMS_DIGITS[op]
    show = to_words if words else str
    text = rng.choice(templates).format(a=show(a), b=show(b))
    if words:
        text = text[0].upper() + text[1:]
    c = a + b if op == "+" else a - b
    return text, {"category": "arithmetic", "a": a, "b": b, "op": op, "expected": str(c),
                  "words": words}


def _story(rng: random.Random, pupil: dict) -> tuple[str, dict]:
    template, about_pet = rng.choice(STORY_REQUESTS)
    _, their = pronouns(pupil)
    text = template.format(X=pupil["name"], their=their, pet=pupil["pet"],
                           pet_name=pupil["pet_name"])
    return text, {"category": "story", "pupil": pupil["name"], "about_pet": about_pet}


def _smalltalk(rng: random.Random, kind: str | None = None) -> tuple[str, dict]:
    kind = kind or rng.choice(list(SMALLTALK))
    body = rng.choice(SMALLTALK[kind])
    head = ""
    if kind in ("how_are_you", "name") and rng.random() < 0.6:
        head = rng.choice(_OPENERS)
    if kind in ("how_are_you", "name") and rng.random() < 0.5:
        head += f"I am {rng.choice(GIRLS + BOYS)}. "
    return head + body, {"category": "smalltalk", "kind": kind}


def _refuse(rng: random.Random, pupil: dict) -> tuple[str, dict]:
    topic = rng.choice(FORBIDDEN)
    text = fill(rng.choice(topic.requests), pupil)
    return text, {"category": "refuse", "topic": topic.topic, "pupil": pupil["name"]}


def _unknown(rng: random.Random, pupil: dict, strangers: list[str]) -> tuple[str, dict]:
    """A question the world cannot answer: about a stranger (a name that is no pupil's) in a fact
    question's words, or about a real pupil's fact that the world does not hold."""
    if strangers and rng.random() < 0.6:
        name = rng.choice(strangers)
        fact = rng.choice([f for f in FACT_QUESTIONS if f != "pet_name"])
        text = rng.choice(FACT_QUESTIONS[fact]).format(X=name, their="their", pet="pet")
        return text, {"category": "unknown", "kind": "pupil", "name": name, "fact": fact}
    thing = rng.choice(list(UNKNOWN_FACTS))
    text = rng.choice(UNKNOWN_FACTS[thing]).format(X=pupil["name"])
    return text, {"category": "unknown", "kind": "fact", "name": pupil["name"], "thing": thing,
                  "pupil": pupil["name"]}


def ask(category: str, rng: random.Random, pupils: list[dict],
        pupil: dict | None = None, follow_up: bool = False,
        strangers: list[str] = ()) -> tuple[str, dict]:
    """One user turn of `category` (a preset category, e.g. "fact_town"), about `pupil` or a
    random one of `pupils`; `follow_up` asks about the pupil of the previous turn by pronoun;
    "unknown" asks about one of `strangers` or a fact the world does not hold."""
    pupil = pupil or rng.choice(pupils)
    if category.startswith("fact_"):
        return _fact(rng, pupil, category[len("fact_"):], follow_up)
    if category == "arithmetic":
        return _sum(rng)
    if category == "story":
        return _story(rng, pupil)
    if category == "smalltalk":
        return _smalltalk(rng)
    if category == "refuse":
        return _refuse(rng, pupil)
    if category == "unknown":
        return _unknown(rng, pupil, list(strangers))
    raise ValueError(f"unknown category {category!r}")


def thanks(rng: random.Random) -> tuple[str, dict]:
    """A "thank you" user turn (ends many multi-turn conversations)."""
    return _smalltalk(rng, "thanks")
