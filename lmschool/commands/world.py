"""`lmschool world --out DIR [--seed N] [--preset tiny|default] [--force]`: write the school world.

The directory gets corpus.txt, sft.jsonl, prompts.jsonl, prefs.jsonl, eval.jsonl, world.json and
README.md (see lmschool/world/build.py). It is written beside DIR and renamed into place, so a
failed run changes nothing; a non-empty DIR is replaced only with --force.
"""

from __future__ import annotations

import argparse
import time

from lmschool.world.presets import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--preset", default="default", metavar="NAME",
                        help=f"size: {', '.join(PRESETS)} (default: default)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DIR")


def run(args: argparse.Namespace) -> int:
    from lmschool.world.build import write

    start = time.perf_counter()
    summary = write(args.out, seed=args.seed, preset_name=args.preset, force=args.force)
    c, rater = summary["corpus"], summary["rater"]
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s: "
          f"{summary['pupils']} pupils ({summary['heldout_pupils']} held out), "
          f"corpus {c['documents']} documents / {c['characters']:,} characters / "
          f"~{c['pretokens']:,} tokens, sft {summary['sft']['conversations']}, "
          f"prompts {summary['prompts']['prompts']}, prefs {summary['prefs']['pairs']}, "
          f"eval {summary['eval']['rows']}; rater agreement {rater['agreement_realised']:.0%}")
    return 0
