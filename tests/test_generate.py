"""Generation: the KV-cache path equals full recompute, padding changes nothing, sampling filters
keep what they should, seeds reproduce, stop tokens end rows, log-probs are log pi_T; the command."""

import pytest
import torch

from lmschool.generate import (
    PackedLinears,
    SamplingConfig,
    compile_for_generation,
    generate,
    sample,
    stream,
    top_k_filter,
    top_p_filter,
)
from lmschool.model import ModelConfig, build_model

V = 61


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = build_model(cfg, seed=3).eval()
    with torch.no_grad():  # a sharper head than the 0.02 init: entropy ~3 nats instead of ~log V
        model.lm_head.weight.mul_(10)
    return model


PROMPTS = [[5, 9, 2, 33, 7, 1, 14], [8, 3], [40, 41, 42, 43, 12], [17]]


def recompute_greedy(model, prompt, n):
    """The naive loop: the whole sequence through the model at every step, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_kv_cache_greedy_equals_full_recompute_with_left_padding(model):
    out = generate(model, PROMPTS, 12, temperature=0)
    for prompt, tokens in zip(PROMPTS, out.tokens):
        assert tokens == recompute_greedy(model, prompt, 12)
        assert tokens == generate(model, [prompt], 12, temperature=0).tokens[0]  # alone, unpadded
    assert out.finished == [False] * len(PROMPTS)
    assert len(set(map(tuple, out.tokens))) > 1  # the rows really differ


def test_logprobs_equal_log_softmax_at_temperature_of_full_recompute(model):
    T = 0.7
    out = generate(model, PROMPTS, 10, temperature=T, seed=0, return_logprobs=True)
    for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
        seq = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = model(seq)[0, len(prompt) - 1:-1]                              # (N, V)
        expected = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4)


def test_same_seed_same_samples_different_seed_different(model):
    a = generate(model, PROMPTS, 16, temperature=1.0, seed=1).tokens
    b = generate(model, PROMPTS, 16, temperature=1.0, seed=1).tokens
    c = generate(model, PROMPTS, 16, temperature=1.0, seed=2).tokens
    assert a == b
    assert a != c
    g = torch.Generator().manual_seed(1)
    assert generate(model, PROMPTS, 16, generator=g).tokens == a


def test_top_k_one_is_greedy(model):
    greedy = generate(model, PROMPTS, 8, temperature=0).tokens
    assert generate(model, PROMPTS, 8, temperature=1.3, top_k=1, seed=5).tokens == greedy


def test_top_p_keeps_exactly_the_nucleus():
    # probabilities 0.05, 0.5, 0.15, 0.3 (unsorted on purpose); sorted: 0.5, 0.3, 0.15, 0.05
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    kept = lambda p: set(torch.isfinite(top_p_filter(logits, p))[0].nonzero()[:, 0].tolist())  # noqa: E731
    assert kept(0.3) == {1}              # the top token alone holds 0.5 >= 0.3
    assert kept(0.5 + 1e-3) == {1, 3}    # 0.5 falls short, 0.5 + 0.3 = 0.8 reaches it
    assert kept(0.9) == {1, 3, 2}        # 0.8 short, 0.95 reaches it
    assert kept(0.96) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    assert torch.equal(top_p_filter(logits, 0.9)[0, [1, 2, 3]], logits[0, [1, 2, 3]])  # kept unchanged


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [False, False, True, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_sampler_draws_in_proportion_and_never_a_filtered_token():
    logits = torch.tensor([0.1, 0.2, 0.7, 0.0]).log().expand(20000, 4)  # last token impossible
    g = torch.Generator().manual_seed(0)
    tokens, _ = sample(logits, 1.0, generator=g)
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7, 0.0]), atol=0.015)
    tokens, _ = sample(torch.tensor([2.0, 1.0, 0.5, 0.0]).expand(5000, 4), 1.0, top_k=2, generator=g)
    assert set(tokens.tolist()) == {0, 1}


@pytest.mark.parametrize("compact", [False, True])
def test_stop_tokens_truncate_and_set_finished(model, compact):
    free = generate(model, PROMPTS, 12, temperature=0).tokens
    stop = free[0][3]
    out = generate(model, PROMPTS, 12, temperature=0, stop_ids=[stop], pad_id=0, compact=compact,
                   return_logprobs=True)
    for row, tokens, finished, logprobs in zip(free, out.tokens, out.finished, out.logprobs):
        if stop in row:
            assert tokens == row[:row.index(stop) + 1] and finished
        else:
            assert tokens == row and not finished
        assert len(logprobs) == len(tokens)
    assert out.finished[0]


def test_dropping_finished_rows_changes_no_sample(model):
    free = generate(model, PROMPTS, 20, temperature=1.0, seed=7).tokens
    stops = [free[0][2], free[2][4]]
    kept = generate(model, PROMPTS, 20, temperature=1.0, seed=7, stop_ids=stops, compact=False)
    dropped = generate(model, PROMPTS, 20, temperature=1.0, seed=7, stop_ids=stops, compact=True)
    assert kept == dropped
    assert sum(kept.finished) >= 2


def test_all_rows_stopping_ends_early(model):
    first = generate(model, PROMPTS, 1, temperature=0).tokens
    out = generate(model, PROMPTS, 50, temperature=0, stop_ids=[t[0] for t in first])
    assert out.tokens == first and all(out.finished)


def test_stream_yields_what_generate_returns(model):
    prompt = PROMPTS[0]
    expected = generate(model, [prompt], 15, temperature=0.9, top_p=0.9, seed=4).tokens[0]
    assert list(stream(model, prompt, 15, temperature=0.9, top_p=0.9, seed=4)) == expected
    stop = expected[5]
    streamed = list(stream(model, prompt, 15, temperature=0.9, top_p=0.9, seed=4, stop_ids=[stop]))
    assert streamed == expected[:expected.index(stop) + 1]
    assert not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("bias", [False, True])
def test_packed_weights_equal_plain_linears(bias):
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, qkv_bias=bias, max_position_embeddings=64)
    model = build_model(cfg, seed=1).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
        model.lm_head.weight.mul_(10)
    if PackedLinears.maybe(model, 4) is None:
        pytest.skip("no oneDNN packed linears on this machine")
    packed = generate(model, PROMPTS, 10, temperature=0.8, seed=2, return_logprobs=True)
    plain = generate(model, PROMPTS, 10, temperature=0.8, seed=2, return_logprobs=True, pack_weights=False)
    assert packed.tokens == plain.tokens
    assert torch.allclose(torch.tensor(packed.logprobs), torch.tensor(plain.logprobs), atol=1e-4)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model is left as it was


def test_packed_weights_are_freed_on_return_and_the_prompt_runs_on_plain_weights(model, monkeypatch):
    """Packing holds a copy of the weights (0.5 GB for SmolLM2): it is freed as soon as `generate`
    returns, without waiting for Python's cyclic collector (a reference cycle kept every call's
    copy until then), and the prompt's pass (many rows, where oneDNN held ~2 GB more through the
    packed weights) runs on the plain ones while every decode step runs packed."""
    import gc
    import weakref

    if PackedLinears.maybe(model, 4) is None:
        pytest.skip("no oneDNN packed linears on this machine")
    made, passes = [], []
    init, backbone = PackedLinears.__init__, type(model.model).forward

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    def recording_backbone(self, ids, *args, **kwargs):
        passes.append((ids.shape[1], any("forward" in m.__dict__ for m in self.modules())))
        return backbone(self, ids, *args, **kwargs)

    monkeypatch.setattr(PackedLinears, "__init__", recording_init)
    monkeypatch.setattr(type(model.model), "forward", recording_backbone)
    gc.disable()
    try:
        generate(model, PROMPTS, 6, temperature=0.8, seed=2)
        assert len(made) == 1 and made[0]() is None
    finally:
        gc.enable()
    assert passes[0] == (max(len(p) for p in PROMPTS), False)     # the prompts: plain weights
    assert len(passes) == 6 and all(packed for _, packed in passes[1:])   # each new token: packed


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                    "up_proj", "down_proj"]])
def test_packed_weights_fold_lora_adapters(model, targets):
    """A model with LoRA adapters samples through packed weights with each adapter folded in
    (q/k/v fused whether all, some or none of them carry adapters): the same tokens and log-probs
    as its unpacked forward; through WithoutAdapters (a reference) the base model's, packed with
    the base weights alone; and an adapter switched off after packing computes as it is."""
    import copy

    from lmschool.adapters import LoraConfig, WithoutAdapters, adapters_disabled, add_lora
    if PackedLinears.maybe(model, 4) is None:
        pytest.skip("no oneDNN packed linears on this machine")
    lora = add_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8.0, targets=targets), base="base", seed=0)
    with torch.no_grad():   # B = 0 at init would make the adapters do nothing
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    kw = dict(temperature=0.8, seed=2, return_logprobs=True)
    packed, plain = generate(lora, PROMPTS, 10, **kw), generate(lora, PROMPTS, 10, pack_weights=False, **kw)
    one = PROMPTS[:1]   # one row: folded but not packed
    assert PackedLinears.maybe(lora, 1) is not None and PackedLinears.maybe(model, 1) is None
    assert generate(lora, one, 10, **kw).tokens == generate(lora, one, 10, pack_weights=False, **kw).tokens
    base = generate(model, PROMPTS, 10, pack_weights=False, **kw)
    assert packed.tokens == plain.tokens != base.tokens   # the adapters change what is sampled
    assert torch.allclose(torch.tensor(sum(packed.logprobs, [])), torch.tensor(sum(plain.logprobs, [])), atol=1e-4)
    reference = generate(WithoutAdapters(lora), PROMPTS, 10, **kw)
    assert reference.tokens == base.tokens
    assert torch.allclose(torch.tensor(sum(reference.logprobs, [])), torch.tensor(sum(base.logprobs, [])), atol=1e-4)
    x = torch.randn(3, 5, 64)
    q_proj = lora.model.layers[0].self_attn.q_proj
    with torch.inference_mode(), PackedLinears(lora, 3, torch.float32):
        assert "forward" in q_proj.__dict__ and "forward" not in q_proj.lora_A.__dict__   # packed, folded
        folded = q_proj(x)
        with adapters_disabled(lora):
            off = q_proj(x)
    assert torch.allclose(off, model.model.layers[0].self_attn.q_proj(x), atol=1e-5)
    assert not torch.allclose(folded, off, atol=1e-3)
    assert not any("forward" in m.__dict__ for m in lora.modules())


@pytest.mark.slow
def test_compile_for_generation_equals_eager_and_refuses_changed_weights(model):
    import copy

    own = copy.deepcopy(model)
    compiled = compile_for_generation(own)
    expected = generate(model, PROMPTS, 8, temperature=1.0, seed=3, stop_ids=[23], return_logprobs=True)
    got = generate(compiled, PROMPTS, 8, temperature=1.0, seed=3, stop_ids=[23], return_logprobs=True)
    assert got.tokens == expected.tokens
    assert torch.allclose(torch.tensor(sum(got.logprobs, [])), torch.tensor(sum(expected.logprobs, [])), atol=1e-4)
    with torch.no_grad():
        own.lm_head.weight.mul_(2)
    with pytest.raises(ValueError, match="changed after compile_for_generation"):
        generate(compiled, PROMPTS, 2)


def test_bf16_autocast_runs(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, PROMPTS, 6, temperature=1.0, seed=0, return_logprobs=True)
    assert [len(t) for t in out.tokens] == [6] * len(PROMPTS)
    assert all(lp <= 0 for row in out.logprobs for lp in row)


def test_edge_cases(model):
    assert generate(model, PROMPTS, 0).tokens == [[]] * len(PROMPTS)
    assert generate(model, [], 5).tokens == []
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(Exception, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="LM head"):
        generate(build_model(model.config, head="score"), PROMPTS, 2)


# ---- the command ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    from lmschool.checkpoint import save_model
    from lmschool.tokenizer import train_tokenizer

    tok = train_tokenizer([], byte_level=True)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("ckpt")
    save_model(root / "policy", build_model(cfg, seed=0), tok)
    save_model(root / "reward", build_model(cfg, head="score", seed=0), tok)
    return root, tok


def test_command_prints_greedy_completion(checkpoint, capsys):
    from lmschool.checkpoint import load_model
    from lmschool.cli import main

    root, tok = checkpoint
    assert main(["generate", str(root / "policy"), "--prompt", "Ada lives in", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    expected = generate(load_model(root / "policy"), [tok.encode("Ada lives in")], 6, temperature=0,
                        stop_ids=[tok.eos_id])
    assert printed == tok.decode(expected.tokens[0], skip_special=True) + "\n"


def test_command_chat_and_seed(checkpoint, capsys):
    from lmschool.cli import main

    root, _ = checkpoint
    args = ["generate", str(root / "policy"), "--chat", "--prompt", "hi", "--max-new-tokens", "5", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_command_errors(checkpoint, tmp_path, capsys):
    from lmschool.cli import main

    root, _ = checkpoint
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(root / "reward"), "--prompt", "x"]) == 2
    assert "reward model" in capsys.readouterr().err
    assert main(["generate", str(root / "policy"), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [({"max_new_tokens": 0}, "max_new_tokens': must be >= 1"),
                                             ({"temperature": float("nan")}, "temperature': must be a number"),
                                             ({"temperature": float("inf")}, "temperature': must be a number")])
def test_sampling_refuses_no_tokens_and_a_temperature_that_is_not_a_number(values, message):
    """`generate --max-new-tokens 0` printed an empty line with exit 0 (bad-input matrix, issue 19)."""
    with pytest.raises(Exception, match=message):
        SamplingConfig(**values)
