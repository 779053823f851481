"""`lmschool chat`: the REPL driven through piped input (turns, /temperature, /reset, /system, /quit),
answers equal to batch generation of the same conversation, whole characters when streaming, the
context kept within bounds, and the command itself in a subprocess."""

from __future__ import annotations

import io

import pytest

from lmschool.commands.chat import Chat, repl
from lmschool.model import ModelConfig, build_model
from lmschool.tokenizer import TextStream, train_tokenizer
from procs import lmschool


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([], byte_level=True)


def make_model(tok, context=256):
    return build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=context), seed=0).eval()


TAUGHT = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}],
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "Five."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi."}],
]


@pytest.fixture(scope="module")
def taught(tok, tmp_path_factory):
    """A tiny model taught four conversations: its answer to "What is 2 plus 3?" depends on
    whether "Hi!" came before."""
    from lmschool.data.sft import SFTBatches, make_example
    from lmschool.losses.lm import lm_loss
    from lmschool.trainer import TrainConfig, fit

    examples = [make_example(*tok.render(c), f"t:{i}") for i, c in enumerate(TAUGHT)]
    cfg = TrainConfig(max_steps=120, batch_size=4, lr=1e-2, warmup_steps=10, log_every=40, eval_every=0,
                      save_every=0, device="cpu", threads=1, precision="fp32")
    run_dir = tmp_path_factory.mktemp("taught")
    trainer, _ = fit(make_model(tok), SFTBatches(examples, 4, pad_id=tok.pad_id), lm_loss, cfg, run_dir,
                     tokenizer=tok, desc="t")
    return trainer.model.eval(), run_dir / "model"


def run_repl(chat, text):
    stdin, stdout, stderr = io.StringIO(text), io.StringIO(), io.StringIO()
    assert repl(chat, stdin, stdout, stderr, interactive=False) == 0
    return stdout.getvalue(), stderr.getvalue(), stdin.read()


def test_piped_turns_and_commands(tok, taught):
    model, _ = taught
    chat = Chat(model, tok, temperature=0, max_new_tokens=30)
    out, err, unread = run_repl(chat, "Hi!\n\nWhat is 2 plus 3?\n/reset\nWhat is 2 plus 3?\n/system Be brief.\n"
                                      "Hello\n/temperature 0.5\n/temperature x\n/nope\n/quit\nnever read\n")
    # one line per user turn; the second answer saw the first turn, the third (after /reset) did not
    assert out.split("\n") == ["Hello! How can I help?", "2 plus 3 is 5.", "Five.", "Hi.", ""]
    assert unread == "never read\n"                    # /quit stops reading
    assert "(conversation cleared)" in err and "(system message set)" in err and "(temperature 0.5)" in err
    assert "/temperature needs a number" in err and "unknown command /nope" in err
    assert chat.temperature == 0.5
    assert chat.messages == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is 2 plus 3?"},
                             {"role": "assistant", "content": "Five."},
                             {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]


def test_streaming_gives_whole_characters(tok):
    text = "naïve ☕ 日本 done"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert "" in pieces[:-1] and not any("\ufffd" in p for p in pieces)


def test_long_conversations_drop_the_oldest_turns(tok):
    model = make_model(tok, context=96)
    chat = Chat(model, tok, temperature=0, max_new_tokens=12)
    out, err, _ = run_repl(chat, "".join(f"Tell me about pupil number {i}.\n" for i in range(4)) + "x" * 200 + "\nok\n")
    assert len(out.split("\n")) == 7
    assert "oldest turn was dropped" in err and "too long for the model's context of 96" in err
    ids, _ = tok.render(chat.messages)
    assert len(ids) <= 96


def test_command_with_piped_stdin(taught):
    _, path = taught
    result = lmschool("chat", path, "--temperature", "0", "--precision", "fp32",
                      input="Hi!\nWhat is 2 plus 3?\n/reset\nWhat is 2 plus 3?\n/quit\n")
    assert result.stdout == "Hello! How can I help?\n2 plus 3 is 5.\nFive.\n"
