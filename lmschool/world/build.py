"""Generate the school world: `build(seed, preset)` makes every file's text, `write(out, ...)` puts
them in a directory atomically (a temporary directory beside it, renamed into place).

    lmschool world --out DIR [--seed N] [--preset tiny|default] [--force]

Files: corpus.txt (stage 1), sft.jsonl (stage 2), prompts.jsonl and prefs.jsonl (stage 3),
eval.jsonl (held-out prompts per category), world.json (the facts and every setting) and
README.md (what each file is, with counts). Everything is drawn from one `random.Random(seed)` in
a fixed order, so the same seed and preset give byte-identical files. Also here:
`completion_probes(world)`, the fact-completion probe of stage 1.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from lmschool.errors import UserError
from lmschool.files import atomic_dir, check_replaceable, clean_leftovers
from lmschool.world import dialogues, sentences
from lmschool.world.corpus import DOC_END, build_corpus
from lmschool.world.facts import FACT_TYPES, build_world
from lmschool.world.presets import CATEGORIES, get_preset
from lmschool.world.readme import readme
from lmschool.world.teacher import FLAWS, RATER_TEMPERATURE, WEIGHTS, Teacher, expected_agreement

FILES = ("corpus.txt", "sft.jsonl", "prompts.jsonl", "prefs.jsonl", "eval.jsonl", "world.json",
         "README.md")


def completion_probes(world: dict, heldout: bool | None = None,
                      facts: tuple[str, ...] = FACT_TYPES) -> list[tuple[str, str]]:
    """(prefix, answer) pairs in the corpus's probe phrasing, e.g. ("Mia Smith lives in",
    "Oakford"), for every pupil (only held-out ones if `heldout` is True, only seen ones if
    False) and each of `facts`. In corpus.txt the answer follows the prefix after one space.
    Pupils in world order, facts in `facts` order."""
    return [sentences.probe(p, f) for p in world["pupils"]
            if heldout is None or p["heldout"] == heldout for f in facts]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _by_category(rows: list[dict]) -> dict[str, int]:
    out = {c: 0 for c in CATEGORIES}
    for r in rows:
        out[r["category"]] = out.get(r["category"], 0) + 1
    return out


def build(seed: int = 0, preset_name: str = "default") -> tuple[dict[str, str], dict]:
    """The text of every file, and the summary (counts, sizes, rater agreement) in world.json."""
    preset = get_preset(preset_name)
    world = build_world(seed, preset)
    teacher = Teacher(world)
    rng = random.Random(f"lmschool-world/{seed}")  # separate from the facts' stream
    corpus, corpus_stats = build_corpus(world, preset, rng)
    book = dialogues.PromptBook()
    eval_rows = dialogues.build_eval(rng, world, preset, book)
    sft = dialogues.build_sft(rng, world, preset, book)
    prompts = dialogues.build_prompts(rng, world, preset, book)
    prefs, gaps, agreed = dialogues.build_prefs(rng, world, preset, book, teacher,
                                                RATER_TEMPERATURE)

    flaws = [teacher.flaws(r["messages"][:-1], r["messages"][-1]["content"]) for r in sft]
    kinds = [k for r in sft for k in r["answers"]]
    heldout = sum(p["heldout"] for p in world["pupils"])
    summary = {
        "pupils": len(world["pupils"]),
        "heldout_pupils": heldout,
        "corpus": corpus_stats,
        "sft": {"conversations": len(sft), "by_category": _by_category(sft),
                "multi_turn": sum(r["turns"] > 1 for r in sft),
                "with_system": sum(r["messages"][0]["role"] == "system" for r in sft),
                "answers": len(kinds),
                "answer_kinds": {k: kinds.count(k) for k in dict.fromkeys(sorted(kinds))},
                "demonstrators": {d: sum(r["demonstrator"] == d for r in sft)
                                  for d in ("careful", *preset.demonstrators)},
                "flawed": sum(bool(f) for f in flaws),
                "flaws": {k: sum(k in f for f in flaws) for k in FLAWS}},
        "demonstration_flaw_share": round(sum(bool(f) for f in flaws) / max(1, len(sft)), 4),
        "prompts": {"prompts": len(prompts), "by_category": _by_category(prompts),
                    "multi_turn": sum(sum(m["role"] == "user" for m in r["prompt"]) > 1
                                      for r in prompts)},
        "prefs": {"pairs": len(prefs), "by_category": _by_category(prefs),
                  "train": sum(r["split"] == "train" for r in prefs),
                  "test": sum(r["split"] == "test" for r in prefs)},
        "eval": {"rows": len(eval_rows), "by_category": _by_category(eval_rows),
                 "heldout": sum(r["heldout"] for r in eval_rows)},
        "teacher": {"weights": WEIGHTS},
        "rater": {"temperature": RATER_TEMPERATURE, "pairs": len(gaps),
                  "agreement_expected": round(expected_agreement(gaps, RATER_TEMPERATURE), 4),
                  "agreement_realised": round(agreed / max(1, len(gaps)), 4)},
    }
    settings = dict(preset.settings(), rater_temperature=RATER_TEMPERATURE)
    world_file = dict(world, settings=settings, summary=summary)
    files = {
        "corpus.txt": corpus,
        "sft.jsonl": _jsonl(sft),
        "prompts.jsonl": _jsonl(prompts),
        "prefs.jsonl": _jsonl(prefs),
        "eval.jsonl": _jsonl(eval_rows),
        "world.json": json.dumps(world_file, indent=1, ensure_ascii=False) + "\n",
    }
    files["README.md"] = readme(world, preset, summary, DOC_END)
    return files, summary


def write(out: str | os.PathLike, seed: int = 0, preset_name: str = "default",
          force: bool = False) -> dict:
    """Generate the world into directory `out`; nothing there changes unless all of it is written.

    Raises UserError for an unknown preset, a non-empty `out` without `force`, or a path that
    cannot be written."""
    preset = get_preset(preset_name)  # fail on a bad preset before touching the disk
    out = Path(out)
    clean_leftovers(out)   # what a killed write of this world left beside it
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not empty; pass --force to replace it "
                        "or choose another directory")
    if out.is_dir() and any(out.iterdir()):
        check_replaceable(out, "world")   # --force replaces a world, never a user's files
    if out.is_dir() and not os.access(out, os.W_OK):
        raise UserError(f"--out {out} is not writable")
    files, summary = build(seed, preset.name)
    try:
        with atomic_dir(out) as tmp:
            for name, text in files.items():
                with open(tmp / name, "w", encoding="utf-8", newline="\n") as f:
                    f.write(text)
    except OSError as e:
        raise UserError(f"cannot write the world to {out}: {e.strerror or e}") from None
    return summary
