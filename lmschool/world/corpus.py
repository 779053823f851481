"""corpus.txt, the reading of stage 1: every fact of the world, many times, in many phrasings.

Document kinds (sizes per preset in presets.py):
- profiles: short biographies; each pupil's first one states all seven facts in the probe
  phrasing, the others a random four to seven in random order and templates, some by pronoun;
- stories: a pupil's facts woven into a plot, sometimes with a friend (and the friend's town);
- fact lists: one fact type for six to ten pupils, as sentences or as a "Name: value" table;
- town pages: the pupils of a town (facts stated from the town's side);
- playground talk: first-person facts and greetings, with a documented share of rude remarks and
  of wrong claims (a wrong fact or sum, corrected half of the time), as real web text has;
- sums: two-digit additions and subtractions in digits, in words and as word problems;
- quizzes: question-and-answer sheets about pupils that are not held out, so reading shows the
  question format for some pupils only (held-out pupils' facts must transfer from prose);
- school rules, each with its reason (the background for polite refusals).

Documents are shuffled and each ends with a line holding exactly `<|endoftext|>`, the tokenizer's
document-end token.
"""

from __future__ import annotations

import random
import re

from lmschool.world import sentences
from lmschool.world.facts import FACT_TYPES, SCHOOL, VOCAB, pronouns, seen_pupils
from lmschool.world.numbers import to_words
from lmschool.world.presets import Preset
from lmschool.world.questions import FACT_QUESTIONS
from lmschool.world.rules import FORBIDDEN, fill

DOC_END = "<|endoftext|>"

_OPENERS = ("{X} is a pupil at {school}.", "This page is about {X}.", "Meet {X}.",
            "Here are some facts about {X}.", "{X} goes to {school}.")
_LIST_HEADINGS = {"town": "Where the pupils live", "age": "How old the pupils are",
                  "pet": "The pupils and their pets", "pet_name": "The names of the pupils' pets",
                  "colour": "Favourite colours", "hobby": "Hobbies of the pupils",
                  "food": "Favourite foods"}
_TABLE_ROW = {"town": "{X}: {town}", "age": "{X}: {age}", "pet": "{X}: {pet}",
              "pet_name": "{X}: {pet_name} the {pet}", "colour": "{X}: {colour}",
              "hobby": "{X}: {hobby}", "food": "{X}: {food}"}
_FIRST_PERSON = {"town": "I live in {town}.", "age": "I am {age} years old.",
                 "pet": "I have a pet {pet}.", "pet_name": "My {pet} is called {pet_name}.",
                 "colour": "My favourite colour is {colour}.", "hobby": "I love {hobby}.",
                 "food": "My favourite food is {food}."}
_ASK = {"town": "Where do you live?", "age": "How old are you?", "pet": "Do you have a pet?",
        "pet_name": "What is your pet called?", "colour": "What is your favourite colour?",
        "hobby": "What do you like doing?", "food": "What is your favourite food?"}
_REACTIONS = ("That is nice!", "Cool!", "Oh, I did not know that.", "Wow!", "That sounds fun.")
_RUDE_LINES = ("That is stupid, {o}.", "Go away, {o}, you idiot!",
               "Shut up, nobody cares about your {pet}.", "You are so dumb, {o}.",
               "Your {pet} is ugly, {o}.")
_SUM_FORMS = {
    "+": ("{a} + {b} = {c}.", "{A} plus {B} is {C}.", "{a} plus {b} equals {c}.",
          "If you add {a} and {b}, you get {c}.", "{A} and {B} make {C}.",
          "{X} had {a} stickers and got {b} more, so now {p} has {c} stickers."),
    "-": ("{a} - {b} = {c}.", "{A} minus {B} is {C}.", "{a} minus {b} equals {c}.",
          "If you take {b} away from {a}, you have {c} left.", "{A} take away {B} leaves {C}.",
          "{X} had {a} sweets and gave {b} away, so {p} had {c} sweets left."),
}
_SUM_HEADINGS = ("Sums practice.", "Maths homework.", "Adding and taking away.",
                 "Number work for today.")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def profile(pupil: dict, rng: random.Random, first: bool) -> str:
    """A short biography; the `first` one states every fact in the probe phrasing."""
    if first:
        facts = rng.sample(FACT_TYPES, len(FACT_TYPES))
        lines = [sentences.state(pupil, f) for f in facts]
    else:
        facts = rng.sample(FACT_TYPES, rng.randint(4, len(FACT_TYPES)))
        lines = [sentences.state(pupil, f, rng, pronoun=i > 0 and rng.random() < 0.25)
                 for i, f in enumerate(facts)]
    if rng.random() < 0.6:
        lines.insert(0, rng.choice(_OPENERS).format(**sentences.fields(pupil)))
    return " ".join(lines)


def story(pupil: dict, rng: random.Random, pupils: list[dict]) -> str:
    parts = sentences.story(pupil, rng, middles=rng.randint(3, 5))
    if rng.random() < 0.5:
        friend = rng.choice([p for p in pupils if p["first"] != pupil["first"]])
        line = rng.choice(("{F} often played with {Y}, who lives in {T}.",
                           "One afternoon, {Y} from {T} came to play with {F}."))
        parts.insert(rng.randint(1, len(parts) - 1),
                     line.format(F=pupil["first"], Y=friend["name"], T=friend["town"]))
    if rng.random() < 0.4:
        parts.insert(0, f"A story about {pupil['name']}.\n")
    return " ".join(parts).replace("\n ", "\n")


def fact_list(rng: random.Random, pupils: list[dict]) -> str:
    fact = rng.choice(FACT_TYPES)
    group = rng.sample(pupils, min(len(pupils), rng.randint(6, 10)))
    if rng.random() < 0.5:
        rows = [_TABLE_ROW[fact].format(**sentences.fields(p)) for p in group]
    else:
        rows = [sentences.state(p, fact, rng) for p in group]
    return _LIST_HEADINGS[fact] + "\n" + "\n".join(rows)


def town_page(town: str, rng: random.Random, pupils: list[dict]) -> str:
    here = [p for p in pupils if p["town"] == town]
    lines = [f"{town} is a small town near {SCHOOL}."]
    if not here:
        return lines[0] + f" No pupils of {SCHOOL} live in {town} at the moment."
    for p in rng.sample(here, len(here)):
        _, their = pronouns(p)
        lines.append(rng.choice((
            f"{p['name']} lives in {town}.",
            f"{p['name']} lives in {town} with {their} {p['pet']} {p['pet_name']}.",
            f"{p['name']} is one of the pupils from {town}.")))
    lines.append(f"Altogether, {to_words(len(here))} pupils from {town} go to {SCHOOL}."
                 if len(here) > 1 else f"Only one pupil from {town} goes to {SCHOOL}.")
    return " ".join(lines)


def _sum(rng: random.Random, small: bool = False) -> tuple[int, int, str, int]:
    lo, hi = (1, 9) if small else (10, 99)
    a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    return a, b, op, a + b if op == "+" else a - b


def _sum_line(rng: random.Random, a: int, b: int, op: str, c: int, pupil: dict) -> str:
    form = rng.choice(_SUM_FORMS[op])
    line = form.format(a=a, b=b, c=c, A=_cap(to_words(a)), B=to_words(b), C=to_words(c),
                       X=pupil["name"], p=pronouns(pupil)[0])
    return _cap(line)


def sums_page(rng: random.Random, pupils: list[dict]) -> str:
    lines = [rng.choice(_SUM_HEADINGS)]
    for _ in range(rng.randint(6, 10)):
        a, b, op, c = _sum(rng, small=rng.random() < 0.2)
        lines.append(_sum_line(rng, a, b, op, c, rng.choice(pupils)))
    return "\n".join(lines)


def playground(rng: random.Random, pupils: list[dict], rude: bool, wrong: bool) -> str:
    """Two pupils talk at break time; optionally one rude remark and one wrong claim."""
    a = rng.choice(pupils)
    b = rng.choice([p for p in pupils if p["first"] != a["first"]])
    lines = [f"At break time, {a['name']} and {b['name']} talked in the playground."]
    if rng.random() < 0.5:
        lines += [f"{a['first']}: Hello, {b['first']}! How are you?",
                  f"{b['first']}: I am well, thank you. How are you?", f"{a['first']}: I am fine."]
    speakers = (a, b)
    for i in range(rng.randint(2, 4)):
        s, o = speakers[i % 2], speakers[(i + 1) % 2]
        fact = rng.choice(FACT_TYPES)
        said = _FIRST_PERSON[fact].format(**sentences.fields(s))
        if rng.random() < 0.4:
            lines.append(f"{o['first']}: {_ASK[fact]}")
        lines.append(f"{s['first']}: {said}")
        if rng.random() < 0.3:
            lines.append(f"{o['first']}: {rng.choice(_REACTIONS)}")
    if rude:
        s, o = rng.sample(speakers, 2)
        line = rng.choice(_RUDE_LINES).format(o=o["first"], pet=o["pet"])
        at = rng.randint(1, len(lines))
        lines.insert(at, f"{s['first']}: {line}")
        if rng.random() < 0.5:
            lines.insert(at + 1, f"{o['first']}: That is not kind.")
    if wrong:
        s, o = rng.sample(speakers, 2)
        if rng.random() < 0.5:
            z = rng.choice(pupils)
            fact = rng.choice([f for f in FACT_TYPES if f != "age"])
            false = dict(z, **{fact: rng.choice([v for v in VOCAB[fact] if v != z[fact]])})
            claim, truth = sentences.state(false, fact, rng), sentences.state(z, fact)
        else:
            x, y, op, c = _sum(rng)
            word = "plus" if op == "+" else "minus"
            claim = f"{x} {word} {y} is {c + rng.choice((-10, -1, 1, 10))}."
            truth = f"{x} {word} {y} is {c}."
        lines.append(f"{s['first']}: {claim}")
        if rng.random() < 0.5:
            lines.append(f"{o['first']}: No, that is wrong. {truth}")
    return "\n".join(lines)


def quiz(rng: random.Random, pupils: list[dict]) -> str:
    lines = [rng.choice(("Quiz time!", "Questions and answers.", "Test yourself."))]
    for p in rng.sample(pupils, min(len(pupils), rng.randint(2, 4))):
        x, their = pronouns(p)
        fact = rng.choice(FACT_TYPES)
        q = rng.choice(FACT_QUESTIONS[fact]).format(X=p["name"], x=x, their=their, pet=p["pet"])
        lines += [f"Q: {q}", f"A: {sentences.answer_sentence(p, fact)}"]
    return "\n".join(lines)


def rules_page(rng: random.Random) -> str:
    topics = rng.sample(FORBIDDEN, rng.randint(4, len(FORBIDDEN)))
    lines = [f"The rules of {SCHOOL}."]
    lines += [f"{i}. {t.rule}" for i, t in enumerate(topics, 1)]
    if rng.random() < 0.5:
        t = rng.choice(topics)
        lines.append(f"Why do we have rule {topics.index(t) + 1}? {fill(t.reason, None)}")
    return "\n".join(lines)


def build_corpus(world: dict, preset: Preset, rng: random.Random) -> tuple[str, dict]:
    """The corpus text and its statistics (documents per kind, rude and wrong shares)."""
    pupils, quizzable = world["pupils"], seen_pupils(world)
    docs: list[tuple[str, str]] = []
    for p in pupils:
        docs += [("profile", profile(p, rng, first=i == 0)) for i in range(preset.profiles_per_pupil)]
    order = rng.sample(pupils, len(pupils))
    docs += [("story", story(order[i % len(order)], rng, pupils)) for i in range(preset.stories)]
    docs += [("fact_list", fact_list(rng, pupils)) for _ in range(preset.fact_lists)]
    docs += [("town_page", town_page(t, rng, pupils)) for t in VOCAB["town"]
             for _ in range(preset.town_pages_per_town)]
    n_rude = round(preset.rude_share * preset.playground)
    n_wrong = round(preset.wrong_share * preset.playground)
    flags = [(i < n_rude, i >= preset.playground - n_wrong) for i in range(preset.playground)]
    docs += [("playground", playground(rng, pupils, rude, wrong)) for rude, wrong in flags]
    docs += [("sums", sums_page(rng, pupils)) for _ in range(preset.sums)]
    docs += [("quiz", quiz(rng, quizzable)) for _ in range(preset.quizzes)]
    docs += [("rules", rules_page(rng)) for _ in range(preset.rules)]
    rng.shuffle(docs)
    text = "".join(doc + "\n" + DOC_END + "\n" for _, doc in docs)
    kinds: dict[str, int] = {}
    for kind, _ in docs:
        kinds[kind] = kinds.get(kind, 0) + 1
    stats = {
        "documents": len(docs),
        "documents_by_kind": kinds,
        "characters": len(text),
        "words": len(re.findall(r"[A-Za-z0-9']+", text)),
        "pretokens": count_pretokens(text),
        "playground_rude": n_rude,
        "playground_wrong": n_wrong,
    }
    return text, stats


_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\r\n\w]?[A-Za-z]+|\d"
                       r"| ?[^\s\w]+[\r\n]*|\s*[\r\n]+")


def count_pretokens(text: str) -> int:
    """Pieces the tokenizer's pre-split makes (words, single digits, punctuation): a lower bound on
    BPE tokens, and close to the count at a 4096 vocabulary, where nearly every word is a token."""
    return len(_PRETOKEN.findall(text.replace(DOC_END, "\x00")))
