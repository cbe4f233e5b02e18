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

BAD_FLAGS = [["--temperature", "-1"], ["--temperature", "nan"], ["--temperature", "inf"], ["--max-tokens", "-5"],
             ["--top-k", "0"], ["--device", "tpu"], ["--seed", "x"], ["--source", "nope"]]
if not torch.cuda.is_available():
    BAD_FLAGS.append(["--device", "cuda"])

@pytest.mark.parametrize("flags", BAD_FLAGS + [["-p", "hi", "--max-tokens", "5000"]], ids=" ".join)
def test_bad_flag_is_one_line_exit_2(home, capsys, flags):
    """Each bad flag: one clear line on stderr, exit code 2, before any generation (--max-tokens past the trained
    context of 64 is known once the checkpoint is read)."""
    with pytest.raises(SystemExit) as e:
        main(flags + ["--kernels", "eager"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = [line for line in err.splitlines() if not line.startswith("python tool:")]
    assert len(lines) == 1 and lines[0].startswith(f"python -m model.chat: error: argument {flags[-2]}"), err
    assert "Traceback" not in err

def test_help_prints_each_default_once(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    entries = out.split("\n  -")[1:]  # one per option
    assert len(entries) >= 8
    for entry in entries:
        assert entry.count("default") <= 1 and "default: None" not in entry, entry

def _scripted_input(monkeypatch, items):
    """input() answering from `items`: strings, or exceptions (KeyboardInterrupt = Ctrl-C, EOFError = Ctrl-D)."""
    items = list(items)

    def fake_input(prompt=""):
        print(prompt, end="")
        item = items.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)

def test_repl_commands_ctrl_c_and_ctrl_d(home, monkeypatch, capsys):
    """Slash commands never reach the model; Ctrl-C at the prompt only clears the line; Ctrl-D leaves."""
    _, model, tok = home
    _scripted_input(monkeypatch, [KeyboardInterrupt, "/help", "/nonsense", "Hello there!", EOFError])
    main(["--temperature", "0", "--max-tokens", "6", "--kernels", "eager"])
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("python tool: ")  # the tool's mode, said at start
    assert "/clear" in out and "/quit" in out and "(unknown command /nonsense" in out
    answers = [part.split("\n")[0] for part in out.split("Assistant: ")[1:]]
    expected = _greedy(model, tok, {"messages": [{"role": "user", "content": "Hello there!"}]}, 6)
    assert answers == [expected.split("\n")[0]]  # one answer: to the one message that was not a command

def test_long_messages_and_history_fit_the_context(home, monkeypatch, capsys):
    """A message longer than the trained context (64) is refused with a note and the session goes on; a history
    that outgrows the context loses its oldest turns; no traceback, ever."""
    _, model, tok = home
    turns = ["Hello there! " * 30, "Hello there!"] + ["How are you today? I am fine." for _ in range(6)]
    _scripted_input(monkeypatch, turns + [EOFError])
    main(["--temperature", "0", "--max-tokens", "6", "--kernels", "eager"])
    out = capsys.readouterr().out
    assert "(not sent: the message takes" in out and "more than the context of 64 tokens" in out
    assert out.count("Assistant: ") == len(turns) - 1
    assert "oldest messages were dropped to fit the context of 64 tokens" in out
    first = _greedy(model, tok, {"messages": [{"role": "user", "content": "Hello there!"}]}, 6)
    assert out.split("Assistant: ")[1].split("\n")[0] == first.split("\n")[0]
