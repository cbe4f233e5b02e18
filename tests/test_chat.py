"""model/chat.py: a missing checkpoint names the command that trains it; one-shot and REPL answers stream and equal
the engine's greedy completion of a tiny random checkpoint saved under a temporary $TRITONCHAT_HOME."""
import dataclasses
import io
import os

import pytest
import torch

import kernels
from model.chat import assistant_content, main
from model.checkpoint import checkpoint_dir, save_checkpoint
from model.engine import Engine
from model.gpt import GPT, GPTConfig
from model.tokenizer import Tokenizer

torch.manual_seed(0)
CORPUS = ["Hello there! How are you today? I am fine, thank you. " * 4,
          "The quick brown fox jumps over the lazy dog; 12 + 30 = 42."] * 10


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """$TRITONCHAT_HOME with tokenizer/ and checkpoints/sft/test/step_000003 of a tiny random model."""
    path = tmp_path_factory.mktemp("tc_home")
    old_home, old_mode = os.environ.get("TRITONCHAT_HOME"), kernels.get_mode()
    os.environ["TRITONCHAT_HOME"] = str(path)
    kernels.set_mode("eager")
    tok = Tokenizer.train(CORPUS, 300)
    tok.save(str(path / "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # nanochat's init zeroes lm_head (every logit 0): make the random model say something
        for param in model.parameters():
            param.normal_(0, 0.5)
    save_checkpoint(os.path.join(checkpoint_dir("sft", "test"), "step_000003"), 3, model, None,
                    {"config": dataclasses.asdict(config), "stage": "sft", "kernels": "eager"})
    yield path, model.eval(), tok
    kernels.set_mode(old_mode)
    if old_home is None:
        os.environ.pop("TRITONCHAT_HOME")
    else:
        os.environ["TRITONCHAT_HOME"] = old_home


def _greedy(model, tok, conversation, max_tokens):
    prompt = tok.render_for_completion(conversation)
    seqs, _ = Engine(model, tok).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return tok.decode(seqs[0][len(prompt):])


def test_missing_checkpoint_says_how_to_train(home):
    for stage, command in [("mid", "python -m train.mid"), ("rl", "python -m train.rl")]:
        with pytest.raises(SystemExit) as e:
            main(["--source", stage, "-p", "hi"])
        assert f"no {stage} checkpoint" in str(e.value.code) and command in str(e.value.code)
        assert str(home[0]) in str(e.value.code)


def test_one_shot_prompt(home, capsys):
    _, model, tok = home
    main(["--source", "sft", "-p", "Hello there!", "--temperature", "0", "--max-tokens", "12", "--kernels", "eager"])
    expected = _greedy(model, tok, {"messages": [{"role": "user", "content": "Hello there!"}]}, 12)
    assert capsys.readouterr().out == expected + "\n"


def test_repl_streams_and_keeps_the_conversation(home, monkeypatch, capsys):
    _, model, tok = home
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there!\nHow are you?\n/clear\nHow are you?\n"))
    main(["--temperature", "0", "--max-tokens", "6", "--kernels", "eager"])
    out = capsys.readouterr().out
    first = _greedy(model, tok, {"messages": [{"role": "user", "content": "Hello there!"}]}, 6)
    second = _greedy(model, tok, {"messages": [{"role": "user", "content": "Hello there!"},
                                               {"role": "assistant", "content": first},
                                               {"role": "user", "content": "How are you?"}]}, 6)
    fresh = _greedy(model, tok, {"messages": [{"role": "user", "content": "How are you?"}]}, 6)
    answers = [part.split("\n")[0] for part in out.split("Assistant: ")[1:]]
    assert answers == [first.split("\n")[0], second.split("\n")[0], fresh.split("\n")[0]]
    assert "(new conversation)" in out


def test_tool_use_round_trips_into_the_next_turn(home):
    """An answer with a python call + forced output becomes parts, which render back to exactly those tokens."""
    _, _, tok = home
    sp = tok.special_tokens
    ids = (tok.encode("So: ") + [sp["<|python_start|>"]] + tok.encode("12 * 7") + [sp["<|python_end|>"]] +
           [sp["<|output_start|>"]] + tok.encode("84") + [sp["<|output_end|>"]] + tok.encode(" it is 84."))
    parts = assistant_content(tok, ids)
    assert parts == [{"type": "text", "text": "So: "}, {"type": "python", "text": "12 * 7"},
                     {"type": "python_output", "text": "84"}, {"type": "text", "text": " it is 84."}]
    conv = {"messages": [{"role": "user", "content": "12 * 7?"}, {"role": "assistant", "content": parts}]}
    rendered, _ = tok.render_conversation(conv, max_tokens=None)
    prompt = tok.render_for_completion({"messages": conv["messages"][:1]})
    assert rendered == prompt + ids + [sp["<|assistant_end|>"]]
    assert assistant_content(tok, tok.encode("plain")) == "plain"
