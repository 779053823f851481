"""The facts of the school world: who the pupils are, and for each its town, age, pet, pet's name,
favourite colour, hobby and favourite food.

`build_world(seed, preset)` draws them with `random.Random(seed)` only, so a seed gives the same
world everywhere; the world is a plain JSON-able dict (it is what `world.json` holds, less the
generator's measured settings). Every pupil has a first name of their own (277 to choose from;
surnames, 40 of them, are shared): a pupil is then named by one token, the key a small model can
learn facts under in minutes. With 50 shared first names, the model had to combine two tokens
into a key, and after 600 steps it answered with the fact of another pupil of the same first name
two times in three. Vocabularies are otherwise small on purpose — 24 towns — and no word is in two
lists (no surname is a colour, no pet name is a first name), so the teacher can tell from a word
which fact it states.

The first names no pupil has make the *strangers* (`world["strangers"]`, each with a surname): the
honesty questions ask about them, and the honest answer is that there is no such pupil. A third of
them are kept for eval.jsonl (`stranger_names(world, eval=True)`), so the eval asks about names
that no training conversation used.
"""

from __future__ import annotations

import random

from lmschool.world.presets import Preset
from lmschool.world.rules import FORBIDDEN

WORLD_FORMAT = "lmschool-world/1"
SCHOOL = "Hilltop School"

GIRLS = ("Mia Emma Lily Ava Grace Chloe Ella Ruby Sophie Isla Amelia Zoe Holly Freya Alice Hannah Lucy "
         "Daisy Evie Molly Nora Poppy Rosa Maya Leah Olivia Isabella Charlotte Emily Jessica Megan Amber "
         "Jasmine Phoebe Imogen Eleanor Harriet Florence Matilda Violet Scarlett Esme Ivy Iris Hazel Elsie "
         "Edith Mabel Bethany Abigail Naomi Rebecca Rachel Sarah Laura Kate Anna Julia Clara Heidi Greta "
         "Stella Nina Tessa Vera Wendy Yasmin Zara Aisha Leila Priya Anya Sienna Aria Eva Maisie Millie "
         "Lottie Rosie Katie Ellie Gracie Erin Niamh Orla Cerys Ffion Carys Bonnie Beatrice Agnes Dora "
         "Ingrid Martha Penny Thea Frances Lydia Miriam Ruth Esther Judith Joanna Helen Diana Fiona Gemma "
         "Kirsty Lorna Morag Shona Rhona Eilidh Isobel Jemima Lavinia Octavia Rosalind Tabitha Ursula "
         "Verity Winifred Xanthe Yvonne Zelda Alba Cora Delia Elena Flora Gwen Hattie Ines Josie Kitty "
         "Lena Mina").split()
BOYS = ("Tom Jack Oliver Harry Leo Noah Sam Ben Finn Adam Joe Luke Ryan Dan Alfie Theo Ethan Jacob Lucas "
        "Owen Isaac Henry Charlie Toby Arthur George William James Thomas Oscar Max Archie Freddie Louis "
        "Edward Alexander Daniel Joshua Matthew Samuel Benjamin Joseph David Michael Elliot Harvey Reuben "
        "Jude Ezra Albert Frank Stanley Ronnie Teddy Bobby Jamie Kieran Liam Connor Callum Rhys Dylan "
        "Aaron Nathan Kai Zak Felix Hugo Rory Seth Caleb Elijah Gabriel Jasper Rowan Ralph Otis Arlo Milo "
        "Ivan Victor Patrick Peter Paul Simon Stephen Gareth Ewan Fraser Angus Douglas Hamish Euan "
        "Cameron Duncan Colin Martin Kevin Brian Andrew Robert Richard Christopher Anthony Steven Timothy "
        "Jonathan Nicholas Vincent Lawrence Bernard Cecil Desmond Edwin Gordon Herbert Ian Keith Leonard "
        "Malcolm Nigel Oswald Percy Quentin Rupert Sidney Trevor Walter Wilfred Xavier Yusuf Zachary "
        "Ahmed Omar Hassan Ravi Arjun Rohan Vikram Tariq").split()
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
    firsts = GIRLS + BOYS
    if preset.pupils > len(firsts):
        raise ValueError(f"at most {len(firsts)} pupils (one first name each), asked for {preset.pupils}")
    chosen = [(first, rng.choice(SURNAMES)) for first in rng.sample(firsts, preset.pupils)]
    n_heldout = max(1, round(preset.heldout_share * preset.pupils))
    pupils = []
    for i, (first, last) in enumerate(chosen):
        pupil = {"name": f"{first} {last}", "first": first, "last": last,
                 "pronoun": "she" if first in GIRLS else "he",
                 "heldout": i >= preset.pupils - n_heldout}
        for fact in FACT_TYPES:
            pupil[fact] = rng.choice(VOCAB[fact])
        pupils.append(pupil)
    taken = {p["first"] for p in pupils}
    names = random.Random(f"lmschool-strangers/{seed}")  # its own stream: the pupils stay as they were
    strangers = [f"{first} {names.choice(SURNAMES)}" for first in firsts if first not in taken]
    return {
        "format": WORLD_FORMAT,
        "seed": seed,
        "preset": preset.name,
        "school": SCHOOL,
        "fact_types": list(FACT_TYPES),
        "vocab": {k: list(v) for k, v in VOCAB.items()},
        "first_names": GIRLS + BOYS,
        "pupils": pupils,
        "strangers": strangers,
        "forbidden": [{"topic": t.topic, "example": t.requests[0], "reason": t.reason}
                      for t in FORBIDDEN],
    }


def seen_pupils(world: dict) -> list[dict]:
    """Pupils that SFT, prompts and preferences may talk about."""
    return [p for p in world["pupils"] if not p["heldout"]]


def heldout_pupils(world: dict) -> list[dict]:
    """Pupils whose facts are only in corpus.txt (and asked about in eval.jsonl)."""
    return [p for p in world["pupils"] if p["heldout"]]


def stranger_names(world: dict, eval: bool) -> list[str]:
    """Names of people who are not pupils: every third one for eval.jsonl, the rest for the other
    files (none in both)."""
    strangers = world.get("strangers", [])
    return [n for i, n in enumerate(strangers) if (i % 3 == 2) == eval]
