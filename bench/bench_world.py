"""Benchmark: `lmschool world --preset default` wall time (bar: under 20 s), and the corpus's size
in BPE tokens at the default pipeline's vocabulary (4096).

    .venv/bin/python bench/bench_world.py            # prints the section, writes bench/RESULTS_world.md
    .venv/bin/python bench/bench_world.py --quick    # 1 repeat, no file written

The command runs as a subprocess (Python start-up included), once as a warm-up and then `repeats`
times; the median is reported, with the tiny preset beside it. The corpus is then tokenized with a
byte-level BPE trained on it by `lmschool.tokenizer.train_tokenizer` (what the tokenizer stage
does), to turn the README's pre-token count into a measured token count.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmschool.tokenizer import train_tokenizer  # noqa: E402
from lmschool.world.corpus import DOC_END  # noqa: E402

BAR_SECONDS = 20.0
VOCAB = 4096
COMMAND = ".venv/bin/python bench/bench_world.py"


def time_command(out: Path, preset: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmschool", "world", "--out", str(out), "--preset", preset,
                    "--force"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, do not write the results file")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS_world.md")
    args = parser.parse_args()
    repeats = 1 if args.quick else 5

    with tempfile.TemporaryDirectory() as tmp:
        default, tiny = Path(tmp) / "default", Path(tmp) / "tiny"
        time_command(default, "default")  # warm-up (file cache, .pyc)
        seconds = statistics.median(time_command(default, "default") for _ in range(repeats))
        tiny_seconds = statistics.median(time_command(tiny, "tiny") for _ in range(repeats))
        summary = json.loads((default / "world.json").read_text(encoding="utf-8"))["summary"]
        docs = [d for d in (default / "corpus.txt").read_text(encoding="utf-8").split(f"\n{DOC_END}\n") if d]
        start = time.perf_counter()
        tokenizer = train_tokenizer(docs, vocab_size=VOCAB)
        train_seconds = time.perf_counter() - start
        tokens = sum(len(ids) for ids in tokenizer.encode_batch(docs)) + len(docs)  # + one DOC_END each

    c, rater = summary["corpus"], summary["rater"]
    verdict = "passes" if seconds < BAR_SECONDS else "FAILS"
    lines = [
        "## The school world (`lmschool world`)",
        "",
        f"`lmschool world --preset default` takes **{seconds:.1f} s** (median of {repeats} runs after a "
        f"warm-up, Python start-up included; bar: under {BAR_SECONDS:.0f} s, {verdict}); `--preset tiny` "
        f"takes {tiny_seconds:.2f} s. Python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, one process.",
        "",
        "| default preset | value |",
        "|---|---:|",
        f"| corpus documents | {c['documents']:,} |",
        f"| corpus characters | {c['characters']:,} |",
        f"| corpus pre-tokens (README estimate) | {c['pretokens']:,} |",
        f"| corpus BPE tokens, vocab {VOCAB} (measured) | {tokens:,} |",
        f"| characters per token | {c['characters'] / tokens:.2f} |",
        f"| BPE tokens / pre-tokens | {tokens / c['pretokens']:.3f} |",
        f"| sft / prompts / prefs pairs / eval rows | {summary['sft']['conversations']:,} / "
        f"{summary['prompts']['prompts']:,} / {summary['prefs']['pairs']:,} / {summary['eval']['rows']} |",
        f"| rater agreement with the teacher (T = {rater['temperature']}) | expected "
        f"{rater['agreement_expected']:.1%}, drawn {rater['agreement_realised']:.1%} |",
        "",
        f"Training the {VOCAB}-token BPE on the corpus took {train_seconds:.1f} s. There is no peer "
        "tool to race: the bar is the issue's 20 s.",
        "",
        f"Reproduce: `{COMMAND}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0 if seconds < BAR_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
