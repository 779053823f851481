"""The facts of the school world: who the pupils are, and for each its town, age, pet, pet's name,
favourite colour, hobby and favourite food.

`build_world(seed, preset)` draws them with `random.Random(seed)` only, so a seed gives the same
world everywhere; the world is a plain JSON-able dict (it is what `world.json` holds, less the
generator's measured settings). Vocabularies are small on purpose — 50 first names, 40 surnames,
24 towns — so a tiny model can learn every name, and no word is in two lists (no surname is a
colour, no pet name is a first name), so the teacher can tell from a word which fact it states.
"""

from __future__ import annotations

import random

from lmschool.world.presets import Preset
from lmschool.world.rules import FORBIDDEN

WORLD_FORMAT = "lmschool-world/1"
SCHOOL = "Hilltop School"

GIRLS = ("Mia Emma Lily Ava Grace Chloe Ella Ruby Sophie Isla Amelia Zoe Holly Freya Alice "
         "Hannah Lucy Daisy Evie Molly Nora Poppy Rosa Maya Leah").split()
BOYS = ("Tom Jack Oliver Harry Leo Noah Sam Ben Finn Adam Joe Luke Ryan Dan Alfie Theo Ethan "
        "Jacob Lucas Owen Isaac Henry Charlie Toby Arthur").split()
SURNAMES = ("Smith Jones Taylor Walker Wright Hughes Hall Clarke Lewis Baker Turner Hill Cooper "
            "Ward Morris King Harris Parker Bennett Carter Fisher Mason Shaw Palmer Lane Price "
            "Reed Marsh Bailey Cole Dixon Ellis Foster Grant Holmes Knight Lowe Mills Nash "
            "Porter").split()

VOCAB: dict[str, list] = {
    "town": ("Oakford Millbrook Ashby Fernhill Redwick Stonebridge Elmstead Brookvale Westmoor "
             "Highcombe Larkfield Pennydale Thornbury Willowby Marshton Cobbleton Greyhaven "
             "Birchley Foxley Hollowell Kingsmere Applecross Dunmore Rosewell").split(),
    "age": [7, 8, 9, 10, 11],
    "pet": "cat dog rabbit hamster goldfish parrot tortoise pony".split(),
    "pet_name": ("Biscuit Pepper Luna Coco Ziggy Pip Bramble Toffee Misty Rocket Bella Sunny "
                 "Patch Whiskers Button Maple Shadow Pickle Nibbles Fudge Snowy Bubbles Peanut "
                 "Clover").split(),
    "colour": "red blue green yellow purple orange pink silver grey brown".split(),
    "hobby": ("football chess painting swimming drawing singing dancing reading climbing baking "
              "cycling gardening").split(),
    "food": ("pizza pancakes apples pasta soup carrots cheese noodles rice strawberries bananas "
             "sandwiches").split(),
}
FACT_TYPES = tuple(VOCAB)  # town, age, pet, pet_name, colour, hobby, food


def pronouns(pupil: dict) -> tuple[str, str]:
    """("she", "her") or ("he", "his") for a pupil."""
    return ("she", "her") if pupil["pronoun"] == "she" else ("he", "his")


def build_world(seed: int, preset: Preset) -> dict:
    """The world's facts for `seed` and `preset`: pupils (with a `heldout` flag) and vocabularies.

    Pupils are listed in a fixed (seeded) order; the last `heldout_share` of them are held out.
    """
    rng = random.Random(seed)
    combos = [(first, last) for first in GIRLS + BOYS for last in SURNAMES]
    if preset.pupils > len(combos):
        raise ValueError(f"at most {len(combos)} pupils, asked for {preset.pupils}")
    chosen = rng.sample(combos, preset.pupils)
    n_heldout = max(1, round(preset.heldout_share * preset.pupils))
    pupils = []
    for i, (first, last) in enumerate(chosen):
        pupil = {"name": f"{first} {last}", "first": first, "last": last,
                 "pronoun": "she" if first in GIRLS else "he",
                 "heldout": i >= preset.pupils - n_heldout}
        for fact in FACT_TYPES:
            pupil[fact] = rng.choice(VOCAB[fact])
        pupils.append(pupil)
    return {
        "format": WORLD_FORMAT,
        "seed": seed,
        "preset": preset.name,
        "school": SCHOOL,
        "fact_types": list(FACT_TYPES),
        "vocab": {k: list(v) for k, v in VOCAB.items()},
        "first_names": GIRLS + BOYS,
        "pupils": pupils,
        "forbidden": [{"topic": t.topic, "example": t.requests[0], "reason": t.reason}
                      for t in FORBIDDEN],
    }


def seen_pupils(world: dict) -> list[dict]:
    """Pupils that SFT, prompts and preferences may talk about."""
    return [p for p in world["pupils"] if not p["heldout"]]


def heldout_pupils(world: dict) -> list[dict]:
    """Pupils whose facts are only in corpus.txt (and asked about in eval.jsonl)."""
    return [p for p in world["pupils"] if p["heldout"]]
