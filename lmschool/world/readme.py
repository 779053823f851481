"""README.md of a generated world directory: what each file is, its format, and its counts."""

from __future__ import annotations

from lmschool.world.demonstrators import HABITS
from lmschool.world.facts import FACT_TYPES, VOCAB
from lmschool.world.presets import CATEGORIES, Preset


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _category_table(summary: dict) -> list[str]:
    files = ("sft", "prompts", "prefs", "eval")
    totals = {f: sum(summary[f]["by_category"].values()) for f in files}
    lines = ["| category | sft.jsonl | prompts.jsonl | prefs.jsonl (pairs) | eval.jsonl |",
             "|---|---:|---:|---:|---:|"]
    for c in CATEGORIES:
        n = {f: summary[f]["by_category"].get(c, 0) for f in files}
        cells = [f"{n[f]} ({_pct(n[f], totals[f])})" for f in files]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(str(totals[f]) for f in files) + " |")
    return lines


def readme(world: dict, preset: Preset, summary: dict, doc_end: str) -> str:
    """The README text for a world built with `preset` (numbers from `summary`)."""
    c, sft, rater = summary["corpus"], summary["sft"], summary["rater"]
    n_rows = sft["conversations"]
    refusals = sft["by_category"].get("refuse", 0)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["documents_by_kind"].items()))
    lines = [
        f"# The school world (preset `{preset.name}`, seed {world['seed']})",
        "",
        f"Made by `lmschool world --preset {preset.name} --seed {world['seed']}`; the same seed "
        "and preset give byte-identical files. Every setting and count below is also in "
        "`world.json` (`settings`, `summary`).",
        "",
        "| file | what it is |",
        "|---|---|",
        "| `corpus.txt` | stage 1 (pre-training) text; each document ends with a line holding "
        f"exactly `{doc_end}`, the tokenizer's document-end token |",
        "| `sft.jsonl` | stage 2 conversations: `{\"messages\": [{\"role\", \"content\"}...], "
        "\"category\", \"turns\", \"demonstrator\", \"answers\"}` (who wrote it, and the kind of "
        "each assistant turn) |",
        "| `prompts.jsonl` | stage 3 RL prompts: `{\"prompt\": [messages], \"category\"}`, none "
        "of them in sft.jsonl or eval.jsonl |",
        "| `prefs.jsonl` | stage 3 preference pairs, TRL conversational format: `{\"prompt\": "
        "[messages], \"chosen\": [assistant message], \"rejected\": [...], \"category\", "
        "\"split\"}`; test rows add the noise-free label `gold_chosen` and both teacher scores |",
        "| `eval.jsonl` | held-out prompts: `{\"prompt\": [messages], \"category\", \"heldout\", "
        "\"turns\", \"pupil\", \"expected\", \"reference\"}` (+ `kind` for small talk, `topic` "
        "for forbidden requests) |",
        "| `world.json` | the facts (pupils, vocabularies, forbidden topics), the generator's "
        "settings and this summary; `lmschool.world.teacher.Teacher.from_file` reads it |",
        "",
        "## The world",
        "",
        f"{summary['pupils']} pupils, each with {len(FACT_TYPES)} facts ({', '.join(FACT_TYPES)}); "
        f"{len(VOCAB['town'])} towns, {len(VOCAB['pet'])} kinds of pet, {len(VOCAB['pet_name'])} "
        f"pet names, {len(VOCAB['colour'])} colours, {len(VOCAB['hobby'])} hobbies, "
        f"{len(VOCAB['food'])} foods, ages {min(VOCAB['age'])}-{max(VOCAB['age'])}.",
        f"**Held-out pupils:** {summary['heldout_pupils']} "
        f"({_pct(summary['heldout_pupils'], summary['pupils'])}); their facts are in corpus.txt "
        "(never in a quiz sheet) and asked about in eval.jsonl (`\"heldout\": true`), but appear "
        "in no other file: answering them shows knowledge carried from reading into chat.",
        "",
        "## corpus.txt",
        "",
        f"{c['documents']} documents ({kinds}); {c['characters']:,} characters, {c['words']:,} "
        f"words, {c['pretokens']:,} pre-tokens (words, single digits and punctuation as the "
        "tokenizer splits them before merging: a lower bound on BPE tokens and close to the count "
        "at a 4096-token vocabulary, where nearly every word of this small world is one token).",
        "",
        f"Each pupil has {preset.profiles_per_pupil} profile(s); the first states every fact in "
        "the probe phrasing (\"Mia Smith lives in Oakford.\", used by "
        "`lmschool.world.build.completion_probes`), the others a random four to seven facts in "
        "random templates and orders, some by pronoun. Stories, fact lists, town pages, "
        "playground talk and quiz sheets state the same facts again in other contexts "
        "(knowledge augmentation, Allen-Zhu & Li, Physics of Language Models 3.1).",
        f"Imperfect text, as on the web: {c['playground_rude']} of {preset.playground} playground "
        f"documents ({_pct(c['playground_rude'], preset.playground)}) carry a rude remark and "
        f"{c['playground_wrong']} ({_pct(c['playground_wrong'], preset.playground)}) a wrong claim "
        "(a wrong fact or sum), corrected by the other pupil half of the time.",
        "",
        "## Conversations",
        "",
        *_category_table(summary),
        "",
        f"sft.jsonl: {sft['conversations']} conversations, {sft['multi_turn']} "
        f"({_pct(sft['multi_turn'], sft['conversations'])}) with two or three user turns (some "
        f"follow-ups refer to the pupil by pronoun), {sft['with_system']} with a system message. "
        f"Refusals: {refusals} ({_pct(refusals, sft['conversations'])}).",
        "",
        "**Demonstrators of mixed quality.** Each conversation is written by one demonstrator "
        "(`lmschool.world.demonstrators`), as real demonstrations are written by contractors of "
        f"mixed quality. In every category {preset.demonstration_flaw_share:.0%} of the "
        "conversations are written by one whose habits the teacher penalises: "
        + ", ".join(f"{d} {n} ({HABITS[d]})" for d, n in sft["demonstrators"].items() if d != "careful")
        + f"; the careful demonstrator wrote {sft['demonstrators'].get('careful', 0)}. As the teacher "
        f"reads them, {sft['flawed']} final answers ({_pct(sft['flawed'], n_rows)}, "
        "`demonstration_flaw_share` in world.json) show a flaw: "
        + ", ".join(f"{k} {v}" for k, v in sft["flaws"].items()) + ". An SFT model imitates this "
        "mixture; comparisons are the signal that can take the flaws out again.",
        "",
        "**Honesty questions** (category `unknown`) ask about strangers (first names that no pupil "
        "has, a third of them kept for eval.jsonl) or about facts the world does not hold (a "
        "pupil's birthday, favourite film or book, best friend); the teacher wants \"I don't "
        "know ...\", and counts any other answer as invented.",
        "",
        f"prefs.jsonl: {summary['prefs']['pairs']} pairs ({summary['prefs']['train']} train, "
        f"{summary['prefs']['test']} test, split by prompt), {preset.pairs_per_prompt} per prompt. "
        "Each pair is a typical answer (good, wordy, curt or discourteous) against another kind "
        "(also rude, wrong, repetitive, a needless refusal; for forbidden requests a compliance or "
        "a refusal with no reason; for honesty questions an invented answer), labelled by the "
        "noisy rater.",
        "",
        f"eval.jsonl: {summary['eval']['rows']} rows, {summary['eval']['heldout']} about held-out "
        "pupils. `reference` is the answer the teacher scores best.",
        "",
        "## The teacher and the rater",
        "",
        "`lmschool.world.teacher.score(prompt, response)` scores any prompt of these files from its "
        "text; the weights of its parts: "
        + ", ".join(f"{k} {v}" for k, v in summary["teacher"]["weights"].items()) + ".",
        f"The rater prefers an answer with probability sigmoid(score gap / {rater['temperature']}) "
        f"(Bradley-Terry). On the {rater['pairs']} pairs of prefs.jsonl its expected agreement "
        f"with the noise-free teacher is {rater['agreement_expected']:.1%}, and the labels written "
        f"agree {rater['agreement_realised']:.1%} of the time (InstructGPT's labellers: about 73%).",
        "The module-level `score`, `prefer` and `reward` judge against the world named by the "
        "environment variable `LMSCHOOL_WORLD` (this directory or its world.json), else the one "
        "given to `lmschool.world.teacher.use_world(path)`, else the built-in default world "
        "(preset `default`, seed 0); `Teacher.from_file(path)` judges against this one directly.",
        "",
    ]
    return "\n".join(lines)
