"""model.common's command-line helpers, and the rule they serve: every entry point answers a bad flag with one line
on stderr and exit status 2, before doing any work."""
import argparse
import importlib

import pytest

from model.common import int_at_least, writable_dir

ENTRY_POINTS = ["train.base", "train.mid", "train.sft", "train.rl", "train.evaluate", "train.speedrun",
                "train.tokenizer", "train.tasks.realdata.draw", "model.chat", "model.server", "bench.report",
                "bench.kernels", "bench.train", "bench.engine", "bench.serve", "bench.tokenizer"]

@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_an_unknown_flag_is_one_line_and_exit_2(module, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--no-such-flag"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "error:" in err, err

def test_train_tokenizer_refuses_a_vocabulary_smaller_than_bytes_and_specials(capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module("train.tokenizer").main(["--vocab-size", "-1"])
    assert e.value.code == 2 and "--vocab-size: must be >= 265, got -1" in capsys.readouterr().err

def test_typed_arguments(tmp_path):
    assert int_at_least(1)("3") == 3
    for text, words in (("0", "must be >= 1, got 0"), ("x", "expected an integer, got 'x'")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            int_at_least(1)(text)
    assert writable_dir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b") and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="cannot create"):
        writable_dir(str(tmp_path / "file" / "sub"))
