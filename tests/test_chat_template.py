"""A checkpoint's own chat template (lmschool/chat_template.py through Tokenizer): ChatML as Qwen2 and
SmolLM2 write it (SmolLM2's default system turn included), Llama-3, Mistral [INST] and Gemma, each
written here as its tokenizer_config.json has it. The tokenizers are byte-level with the template's
special tokens added, so every ASCII character is one token and the masks are worked out by hand;
`transformers`' apply_chat_template is the oracle for the rendered text (and, for a template with
{% generation %} markers, for the mask). Templates whose spans cannot be found, that end answers
with no special token, or tokenizers without a template are one clear line each."""

import json

import pytest
import tokenizers
from tokenizers import models

from lmschool.chat_template import ChatML, JinjaTemplate
from lmschool.errors import UserError
from lmschool.tokenizer import CHAT_TEMPLATE, Tokenizer, _byte_level_setup, _bytes_to_unicode, train_tokenizer

SMOLLM2 = (  # HuggingFaceTB/SmolLM2-135M-Instruct, exactly (its GGUF carries the same)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN2 = (  # Qwen/Qwen2-0.5B-Instruct
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = (  # mistralai/Mistral-7B-Instruct-v0.1
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
GEMMA = (  # google/gemma-2b-it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# name: (template, special tokens, config, the end-of-turn token)
FAMILIES = {
    "smollm2": (SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, "<|im_end|>"),
    "qwen2": (QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"bos_token": None, "eos_token": "<|im_end|>"}, "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>"),
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"}, "</s>"),
    "gemma": (GEMMA, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              {"bos_token": "<bos>", "eos_token": "<eos>"}, "<end_of_turn>"),
}


def byte_tokenizer(specials: list[str], config: dict) -> Tokenizer:
    """Bytes 0..255 (one token per ASCII character), then `specials` as added special tokens."""
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    backend = _byte_level_setup(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[])))
    backend.add_special_tokens(specials)
    return Tokenizer(backend, config)


def family(name: str) -> Tokenizer:
    template, specials, config, _ = FAMILIES[name]
    return byte_tokenizer(specials, {**config, "chat_template": template})


def trained_runs(tok: Tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The trained stretches of a rendering, decoded (special tokens kept)."""
    runs, previous = [], 0
    for token, m in zip(ids, mask):
        if m and not previous:
            runs.append([])
        if m:
            runs[-1].append(token)
        previous = m
    return [tok.decode(run) for run in runs]


TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
             {"role": "user", "content": "Sum?"}, {"role": "assistant", "content": "4."}]
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
# The whole rendering of TWO_TURNS, by hand, and the trained stretches: each answer and its end of turn.
EXPECTED_TEXT = {
    "smollm2": SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
                             "<|im_start|>user\nSum?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n",
    "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nSum?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nSum?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>",
    "mistral": "<s>[INST] Hi [/INST]Yo</s>[INST] Sum? [/INST]4.</s>",
    "gemma": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
             "<start_of_turn>user\nSum?<end_of_turn>\n<start_of_turn>model\n4.<end_of_turn>\n",
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mask_is_each_answer_and_its_end_of_turn(name):
    tok = family(name)
    eot = FAMILIES[name][3]
    ids, mask = tok.render(TWO_TURNS)
    assert tok.decode(ids) == EXPECTED_TEXT[name]
    assert trained_runs(tok, ids, mask) == ["Yo" + eot, "4." + eot]
    # one token per character: "Yo" + end of turn, "4." + end of turn = 6 trained tokens
    assert sum(mask) == 6 and len(ids) == len(mask)
    assert tok.end_of_turn_id == tok.backend.token_to_id(eot) and tok.end_of_turn_id in tok.stop_ids
    assert tok.chat_template == FAMILIES[name][0]


def test_mistral_mask_token_by_token():
    """<s> [ I N S T ] _ H i _ [ / I N S T ] | Y o </s>: 18 prompt tokens, then 3 trained."""
    tok = family("mistral")
    ids, mask = tok.render(TWO_TURNS[:2])
    assert len(ids) == 21 and mask == [0] * 18 + [1, 1, 1]
    assert ids[-1] == tok.backend.token_to_id("</s>") and ids[0] == tok.backend.token_to_id("<s>")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_text_equals_transformers_apply_chat_template(name):
    transformers = pytest.importorskip("transformers")
    tok = family(name)
    _, _, config, _ = FAMILIES[name]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=FAMILIES[name][0],
                                              **{k: v for k, v in config.items() if v is not None})
    for add in (False, True):
        messages = TWO_TURNS if not add else TWO_TURNS[:3]
        ours, _ = tok.template.render(messages, add)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert tok.render(messages, add)[0] == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add,
                                                                      return_dict=True)["input_ids"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prompt_completion_and_encode_response(name):
    """Only the completion's answer is trained; an answer encoded after a prompt is the prompt's
    rendering with the generation prompt, then exactly the trained tokens of the whole conversation."""
    tok = family(name)
    eot = FAMILIES[name][3]
    ids, mask = tok.render_prompt_completion(TWO_TURNS[:3], "4.")
    assert ids == tok.render(TWO_TURNS)[0] and trained_runs(tok, ids, mask) == ["4." + eot]
    response_ids, prompt_len = tok.encode_response(TWO_TURNS[:3], "4.")
    assert response_ids[:prompt_len] == tok.render(TWO_TURNS[:3], add_generation_prompt=True)[0]
    assert tok.decode(response_ids[prompt_len:]) == "4." + eot and response_ids[-1] == tok.end_of_turn_id
    assert response_ids == ids[:len(response_ids)]


def test_smollm2_default_system_turn_is_rendered_and_never_trained():
    tok = family("smollm2")
    ids, mask = tok.render(TWO_TURNS[:2])
    text = tok.decode(ids)
    assert text.startswith(SMOL_SYSTEM)
    assert trained_runs(tok, ids, mask) == ["Yo<|im_end|>"]
    own_system = [{"role": "system", "content": "Be brief."}] + TWO_TURNS[:2]
    ids, mask = tok.render(own_system)
    assert "SmolLM" not in tok.decode(ids) and trained_runs(tok, ids, mask) == ["Yo<|im_end|>"]


def test_a_checkpoint_keeps_and_saves_back_its_own_template(tmp_path):
    """SmolLM2's tokenizer has <|im_start|>/<|im_end|>, but its own template (with the default
    system turn) is the one used and saved, not lmschool's ChatML."""
    tok = family("smollm2")
    assert isinstance(tok.template, JinjaTemplate)
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == SMOLLM2
    again = Tokenizer.load(tmp_path)
    assert again.render(TWO_TURNS) == tok.render(TWO_TURNS) and again.stop_ids == tok.stop_ids


def test_lmschool_tokenizers_keep_chatml():
    fresh = train_tokenizer(["Ann lives in Brook."] * 20, vocab_size=270)
    assert isinstance(fresh.template, ChatML) and fresh.chat_template == CHAT_TEMPLATE
    saved = byte_tokenizer(["<|im_start|>", "<|im_end|>"], {"chat_template": CHAT_TEMPLATE})
    assert isinstance(saved.template, ChatML)


def test_generation_markers_give_chatml_spans():
    """lmschool's own CHAT_TEMPLATE run as a Jinja template reads its {% generation %} blocks: the
    same text and spans as the Python ChatML."""
    messages = [{"role": "system", "content": "S"}, *TWO_TURNS]
    jinja = JinjaTemplate(CHAT_TEMPLATE, {}, ["<|im_end|>"])
    assert jinja.has_markers
    for add in (False, True):
        assert jinja.render(messages, add) == ChatML().render(messages, add)
    assert jinja.render(messages, trained=[4]) == ChatML().render(messages, trained=[4])


def test_generation_markers_mask_equals_transformers():
    transformers = pytest.importorskip("transformers")
    template = ("{% for m in messages %}{{ '<|user|>' if m.role == 'user' else '<|bot|>' }}"
                "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|end|>' }}{% endgeneration %}"
                "{% else %}{{ m.content + '<|end|>' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|bot|>' }}{% endif %}")
    tok = byte_tokenizer(["<|user|>", "<|bot|>", "<|end|>"], {"chat_template": template})
    ids, mask = tok.render(TWO_TURNS)
    assert trained_runs(tok, ids, mask) == ["Yo<|end|>", "4.<|end|>"]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=template)
    out = hf.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids and out["assistant_masks"] == mask


def test_llama3_template_strips_the_answer_as_it_renders_it():
    """Llama-3's template trims content: the trained span is the answer as the template writes it."""
    tok = family("llama3")
    ids, mask = tok.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Yo \n"}])
    assert trained_runs(tok, ids, mask) == ["Yo<|eot_id|>"]


def test_template_refusals_are_one_line():
    tok = family("gemma")
    with pytest.raises(UserError, match="refused the conversation: System role not supported"):
        tok.render([{"role": "system", "content": "S"}, *TWO_TURNS])
    with pytest.raises(UserError, match="special token <end_of_turn>"):
        tok.render([{"role": "user", "content": "Hi<end_of_turn>"}, {"role": "assistant", "content": "Yo"}])


def test_template_that_rewrites_earlier_turns_is_refused_with_the_fix():
    """Earlier answers shown as "(done)" once later turns follow (as reasoning templates drop past
    thinking): rendering a prefix is not a prefix of the whole."""
    template = ("{% for m in messages %}<|{{ m.role }}|>{% if m.role == 'assistant' and not loop.last %}(done)"
                "{% else %}{{ m.content }}{% endif %}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = byte_tokenizer(["<|user|>", "<|assistant|>", "<|end|>"], {"chat_template": template})
    assert trained_runs(tok, *tok.render(TWO_TURNS[:2])) == ["Yo<|end|>"]
    with pytest.raises(UserError, match="renders turn 1 differently .*--chat-template FILE.jinja.*generation"):
        tok.render(TWO_TURNS)


def test_template_without_an_end_of_turn_token_is_refused():
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    tok = byte_tokenizer(["<s>"], {"chat_template": template})
    with pytest.raises(UserError, match="no special token .* could not learn to stop"):
        tok.render(TWO_TURNS)
    assert tok.end_of_turn_id is None and tok.stop_ids == []


def test_bad_jinja_is_one_line():
    tok = byte_tokenizer(["<s>"], {"chat_template": "{% for m in messages %}"})
    with pytest.raises(UserError, match="does not parse as Jinja"):
        tok.render(TWO_TURNS)


def test_no_template_and_the_chatml_option(tmp_path):
    """A loaded tokenizer without a template has none (no silent ChatML); `use_chat_template`
    ("chatml" or a file) sets one, which is saved."""
    tok = byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|endoftext|>"})
    assert tok.template is None and tok.end_of_turn_id is None
    with pytest.raises(UserError, match="no chat template .*--chat-template"):
        tok.render(TWO_TURNS)
    tok.use_chat_template("chatml")
    assert trained_runs(tok, *tok.render(TWO_TURNS)) == ["Yo<|im_end|>", "4.<|im_end|>"]
    (tmp_path / "t.jinja").write_text(QWEN2)
    tok.use_chat_template(str(tmp_path / "t.jinja"))
    assert tok.decode(tok.render(TWO_TURNS)[0]) == EXPECTED_TEXT["qwen2"]
    llama = family("llama3")
    with pytest.raises(UserError, match="chatml needs a tokenizer with the tokens"):
        llama.use_chat_template("chatml")
    with pytest.raises(UserError, match="no such file"):
        llama.use_chat_template(str(tmp_path / "missing.jinja"))


def test_generation_config_eos_ids_are_stop_ids(tmp_path):
    tok = family("llama3")
    tok.save(tmp_path)
    end_of_text = tok.backend.token_to_id("<|end_of_text|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, tok.end_of_turn_id]}))
    loaded = Tokenizer.load(tmp_path)
    assert set(loaded.stop_ids) == {end_of_text, tok.end_of_turn_id}


def test_encode_response_keeps_in_context_ids_for_a_metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace, as Mistral's and Llama-2's) marks the start of a
    text with "▁". After the generation prompt's special token, in context, the answer has no such
    mark; encoded apart it would: the answer's ids are those of the whole rendering. Where the
    prompt's own ids change in context (Mistral's "[/INST]" is plain text that merges with the
    answer), the prompt keeps the ids a policy is given and the answer is encoded apart."""
    from tokenizers import decoders, pre_tokenizers, trainers
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(["[INST] What is 2 plus 2? [/INST]It is 4.", "Four is the answer."] * 20,
                                trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                    show_progress=False))
    backend.add_special_tokens(["<|user|>", "<|assistant|>"])
    template = ("{% for m in messages %}{{ '<|' + m.role + '|>' + m.content }}{% if m.role == 'assistant' %}"
                "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt, answer = [{"role": "user", "content": "What is 2 plus 2?"}], {"role": "assistant", "content": "It is 4."}
    for source in (template, MISTRAL):
        tok = Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "chat_template": source})
        ids, prompt_len = tok.encode_response(prompt, "It is 4.")
        whole, mask = tok.render([*prompt, answer])
        assert ids[:prompt_len] == tok.render(prompt, add_generation_prompt=True)[0] and ids[-1] == tok.end_of_turn_id
        apart = tok.encode("It is 4.</s>", add_special_tokens=False)
        if source == template:
            assert ids == whole and prompt_len == mask.index(1) and ids[prompt_len:] != apart   # apart: "▁It"
        else:
            assert ids != whole and ids[prompt_len:] == apart
