"""LoRA (lmschool/adapters.py) on tiny models: adapters at init compute the base model exactly;
only adapters (and a reward model's head) train; merging equals the adapters applied; switching
them off gives the base's log-probs exactly (DPO's reference, with no second copy); peft loads
lmschool's adapters onto the transformers base with the same logits and scores, and lmschool
loads peft's; a LoRA run is usable wherever a checkpoint is (generate, eval, score, merge, the next
stage's --init) and resumes as an uninterrupted run; bad input (targets that name no projection,
an adapter where a full checkpoint is needed and the reverse, resuming with other lora settings)
is one clear line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmschool.adapters import (ADAPTER_CONFIG, LoRALinear, LoraConfig, WithoutAdapters, add_lora, adapters_disabled,
                               merge_adapters)
from lmschool.checkpoint import load_model, save_model
from lmschool.cli import main
from lmschool.errors import UserError
from lmschool.losses.preference import sequence_logprobs
from lmschool.model import ModelConfig, build_model
from lmschool.optim import build_optimizer
from lmschool.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = ["threads=1", "precision=fp32", "device=cpu"]
DPO = ["batch_size=4", "lr=3e-3", "warmup_steps=2", "log_every=1", "eval_max_new_tokens=8", "eval_batch_size=16", *CPU]


@pytest.fixture(scope="module")
def tok(world):
    return train_tokenizer([(world / "corpus.txt").read_text(), (world / "sft.jsonl").read_text()], vocab_size=600)


def tiny(tok, **kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 384, **kw})


@pytest.fixture(scope="module")
def sft(tok, tmp_path_factory):
    """A stand-in SFT checkpoint (a random tiny model with the chat tokenizer)."""
    path = tmp_path_factory.mktemp("sft") / "model"
    save_model(path, build_model(tiny(tok), seed=0), tok, {"stage": "sft"})
    return path


def randomise_adapters(model, seed=1):
    """B != 0 (at init it is 0 and the adapters do nothing), as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n or n.startswith("score")):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


IDS = torch.randint(0, 600, (2, 17), generator=torch.Generator().manual_seed(0))


# ---- the adapters ----------------------------------------------------------------------------------

def test_adapters_at_init_compute_the_base_model_exactly(tok):
    base = build_model(tiny(tok), seed=0).eval()
    model = add_lora(build_model(tiny(tok), seed=0), LoraConfig(r=4), base="x").eval()
    assert torch.equal(model(IDS), base(IDS))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 7
    # names of the base weights are unchanged (HF's), so they still load from and save to HF files
    assert set(base.state_dict()) <= set(model.state_dict())


def test_only_the_adapters_train_and_a_reward_models_head_with_them(tok):
    model = add_lora(build_model(tiny(tok), seed=0), LoraConfig(r=4, targets=["q_proj", "v_proj"]), base="x")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{p}.lora_{ab}.weight" for i in range(2)
                         for p in ("q_proj", "v_proj") for ab in "AB"}
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2):   # step 1 moves B only (A's gradient is B^T dy = 0 while B = 0), step 2 both
        model(IDS).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {n for n in trainable if "lora_B" in n or step == 1}
    rm = add_lora(build_model(tiny(tok), head="score", seed=0), LoraConfig(r=4), base="x", modules_to_save=("score",))
    assert "score.weight" in {n for n, p in rm.named_parameters() if p.requires_grad}


def test_merging_equals_the_adapters_applied(tok):
    model = randomise_adapters(add_lora(build_model(tiny(tok), seed=0), LoraConfig(r=4, alpha=8), base="x")).eval()
    applied = model(IDS)
    merged = merge_adapters(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert torch.allclose(merged(IDS), applied, atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in merged.parameters())


def test_adapters_off_give_the_references_log_probs_exactly(tok):
    """DPO's and PPO's reference is the policy with its adapters off: the same numbers as the SFT
    model loaded on its own, with the policy still in training mode."""
    reference = build_model(tiny(tok, dropout=0.1), seed=0).eval()
    policy = randomise_adapters(add_lora(build_model(tiny(tok, dropout=0.1), seed=0), LoraConfig(r=4), base="x"))
    policy.train()
    labels = IDS.clone()
    labels[:, :5] = -100
    view = WithoutAdapters(policy)
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(view(IDS), labels), sequence_logprobs(reference(IDS), labels))
        assert torch.equal(view.hidden(IDS), reference.hidden(IDS))
        with adapters_disabled(policy):
            assert torch.equal(policy.eval()(IDS), reference(IDS))
    policy.train()
    view.eval().requires_grad_(False)        # as the stages treat a reference: the policy is untouched
    assert policy.training and any(p.requires_grad for p in policy.parameters())
    assert not torch.equal(policy.eval()(IDS), reference(IDS))     # the adapters are back on


# ---- the PEFT format: peft is the oracle ------------------------------------------------------------

def test_peft_loads_the_adapter_onto_the_transformers_base_with_the_same_logits(tok, sft, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = randomise_adapters(add_lora(load_model(sft), LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj",
                               "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), base=str(sft))).eval()
    save_model(tmp_path / "adapter", model, tok, {"stage": "sft"})
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "config.json" not in files and {ADAPTER_CONFIG, "adapter_model.safetensors"} <= set(files)
    base = transformers.AutoModelForCausalLM.from_pretrained(sft).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(IDS)
        assert (theirs(IDS).logits - ours).abs().max() <= 1e-4
        # transformers alone, from the adapter directory (base_model_name_or_path names the base)
        direct = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
        assert (direct(IDS).logits - ours).abs().max() <= 1e-4
        # and lmschool loads its adapter directory as the merged model
        assert (load_model(tmp_path / "adapter")(IDS) - ours).abs().max() <= 1e-4


def test_peft_loads_a_reward_model_adapter_with_its_head(tok, sft, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = load_model(sft, head="score", new_head=True)
    model = randomise_adapters(add_lora(model, LoraConfig(r=4), base=str(sft), modules_to_save=("score",))).eval()
    save_model(tmp_path / "rm", model, tok, {"kind": "reward", "reward_bias": 0.0})
    assert json.loads((tmp_path / "rm" / ADAPTER_CONFIG).read_text())["modules_to_save"] == ["score"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "rm").eval()
    hf = theirs.base_model.model
    with torch.no_grad():
        ours = model(IDS)                                                            # (B, T)
        h = hf.model(IDS).last_hidden_state
        scores = theirs.base_model.model.score(h).squeeze(-1)                        # every position
        assert (scores - ours).abs().max() <= 1e-4
        assert (load_model(tmp_path / "rm", head="score")(IDS) - ours).abs().max() <= 1e-4


def test_lmschool_loads_an_adapter_peft_wrote(tok, sft, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(sft)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(sft)
    (tmp_path / "peft" / ADAPTER_CONFIG).write_text(json.dumps(config))
    with torch.no_grad():
        assert (load_model(tmp_path / "peft")(IDS) - theirs(IDS).logits).abs().max() <= 1e-4


# ---- LoRA runs ---------------------------------------------------------------------------------------

def dpo(init, world, out, *extra) -> int:
    return main(["dpo", "--init", str(init), "--data", str(world / "prefs.jsonl"), "--out", str(out), *DPO, *extra])


@pytest.fixture(scope="module")
def lora_dpo(sft, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    assert dpo(sft.parent, world, out, "max_steps=3", "lora.r=4", "lora.alpha=8", "lr=3e-2") == 0
    return out


def test_a_lora_dpo_run_starts_at_its_reference_and_saves_an_adapter(lora_dpo, sft):
    first = json.loads((lora_dpo / "metrics.jsonl").read_text().splitlines()[0])
    # step 1: the policy is the base (B = 0) and the reference is the base: log-ratios exactly 0
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    config = json.loads((lora_dpo / "model" / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(sft.resolve())
    assert not (lora_dpo / "model" / "config.json").exists()
    with torch.no_grad():   # the trained adapter moved the model
        assert not torch.equal(load_model(lora_dpo)(IDS), load_model(sft)(IDS))


def test_a_lora_run_is_usable_wherever_a_checkpoint_is(lora_dpo, sft, world, tok, tmp_path, capsys):
    assert main(["generate", str(lora_dpo), "--prompt", "Mia", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert main(["eval", str(lora_dpo), "--data", str(world / "eval.jsonl"), "--max-new-tokens", "4",
                 "--out", str(tmp_path / "eval.jsonl")]) == 0
    # the next stage's --init: the merged model, trained in full
    assert dpo(lora_dpo, world, tmp_path / "next", "max_steps=1") == 0
    assert (tmp_path / "next" / "model" / "model.safetensors").is_file()
    # merge writes a plain checkpoint with the same logits as the adapter applied
    assert main(["merge", str(sft), str(lora_dpo), "--out", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and not (merged / ADAPTER_CONFIG).exists()
    assert json.loads((merged / "config.json").read_text())["lmschool"]["stage"] == "dpo"
    with torch.no_grad():
        assert (load_model(merged)(IDS) - load_model(lora_dpo)(IDS)).abs().max() <= 1e-5


def test_a_lora_reward_model_scores_and_is_a_ppo_reward_with_a_lora_critic(sft, world, tmp_path, capsys):
    rm = tmp_path / "rm"
    assert main(["reward", "--init", str(sft), "--data", str(world / "prefs.jsonl"), "--out", str(rm),
                 "max_steps=2", "lora.r=4", "batch_size=4", *CPU]) == 0
    assert json.loads((rm / "model" / ADAPTER_CONFIG).read_text())["task_type"] == "SEQ_CLS"
    capsys.readouterr()
    assert main(["score", str(rm), "--prompt", "Hi", "--response", "Hello"]) == 0
    float(capsys.readouterr().out.strip().split()[-1])
    out = tmp_path / "ppo"
    assert main(["ppo", "--init", str(sft), "--reward", str(rm), "--prompts", str(world / "prompts.jsonl"),
                 "--out", str(out), "max_steps=2", "lora.r=4", "batch_size=4", "minibatch_size=4",
                 "max_new_tokens=6", *CPU]) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["kl"] == 0.0 and all("critic_grad_norm" in m for m in metrics)
    assert (out / "model" / ADAPTER_CONFIG).is_file()


def test_a_lora_run_resumes_as_an_uninterrupted_one(sft, world, tmp_path):
    extra = ["max_steps=4", "lora.r=4", "lr=3e-2", "eval_every=0"]
    assert dpo(sft, world, tmp_path / "full", *extra) == 0
    assert dpo(sft, world, tmp_path / "part", *extra, "save_every=2") == 0
    part = tmp_path / "part"
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-00000002"]
    assert (part / "checkpoints" / "step-00000002" / ADAPTER_CONFIG).is_file()
    shutil.rmtree(part / "model")
    (part / "summary.json").unlink()
    assert dpo(sft, world, part, *extra, "save_every=2", "--resume") == 0

    def untimed(path):
        return [{k: v for k, v in json.loads(x).items() if not k.endswith("per_s")}
                for x in (path / "metrics.jsonl").read_text().splitlines()]

    assert untimed(tmp_path / "full") == untimed(part)
    a, b = load_model(tmp_path / "full"), load_model(part)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_lora_ppo_run_with_a_lora_critic_resumes_as_an_uninterrupted_one(sft, world, tmp_path):
    """The critic's adapters and head travel in trainer_state.pt (its trained tensors only)."""
    def ppo(out, *extra):
        return main(["ppo", "--init", str(sft), "--scorer", "teacher", "--prompts", str(world / "prompts.jsonl"),
                     "--out", str(out), "max_steps=4", "lora.r=4", "batch_size=4", "minibatch_size=4",
                     "max_new_tokens=6", "lr=1e-2", "critic_lr=1e-2", *CPU, *extra])

    assert ppo(tmp_path / "full") == 0
    part = tmp_path / "part"
    assert ppo(part, "save_every=2") == 0
    state = torch.load(part / "checkpoints" / "step-00000002" / "trainer_state.pt", weights_only=True)
    assert set(state["critic"]) == {n for n, p in load_model(sft, head="score", new_head=True).named_parameters()
                                    if n == "score.weight"} | {k for k in state["critic"] if "lora_" in k}
    shutil.rmtree(part / "model")
    (part / "summary.json").unlink()
    assert ppo(part, "save_every=2", "--resume") == 0

    def untimed(path):
        return [{k: v for k, v in json.loads(x).items() if not k.endswith(("seconds", "per_s"))}
                for x in (path / "metrics.jsonl").read_text().splitlines()]

    assert untimed(tmp_path / "full") == untimed(part)
    a, b = load_model(tmp_path / "full"), load_model(part)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- bad input ----------------------------------------------------------------------------------------

def test_targets_that_name_no_projection_are_refused(sft, world, tmp_path, capsys):
    assert dpo(sft, world, tmp_path / "run", "lora.r=4", "lora.targets=[q_proj,qkv]") == 2
    err = capsys.readouterr().err
    assert "lora.targets" in err and "'qkv'" in err and "q_proj" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_an_adapter_where_a_full_checkpoint_is_needed_and_the_reverse(lora_dpo, sft, world, tmp_path, capsys):
    # a new adapter on an adapter: its base must be a full checkpoint; the fix is merge
    assert dpo(lora_dpo, world, tmp_path / "run", "lora.r=4") == 2
    err = capsys.readouterr().err
    assert "is a LoRA adapter" in err and "lmschool merge" in err and not (tmp_path / "run").exists()
    # merge: BASE must be a full checkpoint, ADAPTER an adapter
    assert main(["merge", str(lora_dpo), str(lora_dpo), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "BASE" in err and "is a LoRA adapter" in err and str(sft) in err
    assert main(["merge", str(sft), str(sft), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "ADAPTER" in err and "not a LoRA adapter" in err and "needs no merge" in err
    assert not (tmp_path / "m").exists()


def test_resuming_with_other_lora_settings_is_refused(sft, world, tmp_path, capsys):
    out = tmp_path / "run"
    assert dpo(sft, world, out, "max_steps=2", "save_every=1", "lora.r=4") == 0
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert dpo(sft, world, out, "max_steps=2", "save_every=1", "--resume") == 2
    err = capsys.readouterr().err
    assert "started with LoRA adapters" in err and "config.yaml" in err


def test_an_adapter_finds_its_base_after_the_runs_are_moved(sft, world, tmp_path):
    """base_model_name_or_path is absolute (as PEFT reads it); when the runs directory holding both
    moves, the adapter finds its base where it is relative to it."""
    runs = tmp_path / "runs"
    shutil.copytree(sft.parent, runs / "sft")
    assert dpo(runs / "sft", world, runs / "dpo", "max_steps=1", "lora.r=4", "lora.alpha=8", "lr=3e-2") == 0
    with torch.no_grad():
        before = load_model(runs / "dpo")(IDS)
    moved = tmp_path / "elsewhere" / "runs"
    shutil.move(runs, moved)
    config = json.loads((moved / "dpo" / "model" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str((runs / "sft" / "model").resolve())   # gone now
    with torch.no_grad():
        assert torch.equal(load_model(moved / "dpo")(IDS), before)
    shutil.rmtree(moved / "sft")
    with pytest.raises(UserError, match="which does not exist here"):
        load_model(moved / "dpo")
