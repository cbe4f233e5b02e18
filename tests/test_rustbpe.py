"""rustbpe (the Rust BPE trainer) against a slow, obviously-correct pure-Python trainer, plus bad inputs.

Tie-break rule (both trainers): merge the pair with the highest count; among equal counts the lexicographically
smallest pair of token ids (left, right). rustbpe is part of the install (`pip install -e .` builds it): if it is
missing these tests fail on the import, they never skip.
"""
import random
from collections import Counter

import pytest
import regex
import tiktoken

import tritonchat_rustbpe as rustbpe
from model.tokenizer import SPLIT_PATTERN
from stand_ins import CORPORA, zipf_corpus

random.seed(0)

def reference_train(texts, vocab_size, pattern=SPLIT_PATTERN):
    """Byte-level BPE the slow way: recount every pair of every chunk before each merge."""
    chunks = Counter(m for t in texts for m in regex.findall(pattern, t))
    words = [(list(c.encode("utf-8")), n) for c, n in chunks.items()]
    merges = []
    for new_id in range(256, vocab_size):
        counts = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                counts[pair] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # highest count, then the smallest pair
        merges.append(best)
        for k, (ids, n) in enumerate(words):
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[k] = (out, n)
    return merges

SPLIT_POOL = (list("abcXYZ \u00e9\u00df\u017f'sdmtlLvVeErRSDMT0123456789\u0663\u00b2\u00bd\u216b.,;:!?\"-()[]{}<>")
              + ["'", "'", " ", " ", "  ", "\n", "\r", "\r\n", "\t", "\x0b", "\x0c", "\x85", "\xa0", "\u2028",
                 "\u3000", "\x1c", "\x00", "\x7f", "\u0301", "\u200d", "\ufe0f", "\U0001f600", "\U0001f1eb",
                 "\u65e5", "\u0639", "\u0939", "\u093f", "\u03a9", "\u0436", "\u1f88"])

def test_gpt4_scanner_equals_the_regex():
    """The hand-written GPT-4 splitter == fancy-regex on the same pattern == Python's `regex` module."""
    rng = random.Random(7)
    samples = ["", "'s 'S '\u017f 'll 'LL 'lL 've 'Re 'x 'l", "a  b   c\n\n  d \r\n\r\n x  ", "  \t\n", "x   ",
               "1234567 \u0663\u0663\u0663 \u00bd\u00bd\u00bd", "...\n\n!!", " ...", " (a", "\u00a0\u00a0a"]
    samples += ["".join(rng.choice(SPLIT_POOL) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    fast_all, regex_all = rustbpe.split_texts(samples), rustbpe.split_texts(samples, force_regex=True)
    for s, fast, slow in zip(samples, fast_all, regex_all):
        assert fast == slow, repr(s)
        assert "".join(fast) == s
        if "\x1c" not in s and "\x85" not in s:  # Python's regex counts these as \s, Rust's Unicode tables do not
            assert fast == regex.findall(SPLIT_PATTERN, s), repr(s)

@pytest.mark.parametrize("name", list(CORPORA))
@pytest.mark.parametrize("vocab_size", [256, 300, 420])
def test_matches_reference(name, vocab_size):
    texts = CORPORA[name]
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size)
    ref = reference_train(texts, vocab_size)
    assert tok.get_merges() == ref
    assert tok.get_vocab_size() == 256 + len(ref)

def test_matches_reference_custom_pattern_and_buffering():
    texts = zipf_corpus(30, seed=2)
    pattern = r"\w+|[^\w\s]+|\s+"
    ref = reference_train(texts, 350, pattern)
    for buffer_size in (1, 7, 8192, 2**50):  # batches of the stream must not change the counts
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), 350, pattern=pattern, buffer_size=buffer_size)
        assert tok.get_merges() == ref
        assert tok.get_pattern() == pattern

def test_threads_do_not_change_the_result():
    texts = zipf_corpus(600, seed=3)
    results = []
    for threads in (1, 2, 4):
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), 2000, buffer_size=64, num_threads=threads)
        results.append(tok.get_merges())
    assert len(results[0]) == 2000 - 256
    assert results[0] == results[1] == results[2]

def test_mergeable_ranks_and_encode_match_tiktoken():
    texts = zipf_corpus(200, seed=4) + CORPORA["unicode"] + CORPORA["english"]
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(texts, 1200)
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(1200))
    assert all(isinstance(b, bytes) for b, _ in ranks) and ranks[97] == (b"a", 97)
    vocab = [b for b, _ in ranks]
    for k, (a, b) in enumerate(tok.get_merges()):
        assert vocab[256 + k] == vocab[a] + vocab[b]
    assert tok.get_pattern() == SPLIT_PATTERN == rustbpe.GPT4_PATTERN
    enc = tiktoken.Encoding("t", pat_str=tok.get_pattern(), mergeable_ranks=dict(ranks), special_tokens={})
    samples = zipf_corpus(20, seed=5) + CORPORA["unicode"] + ["", " ", "\n\n\n", "x" * 1000, "1234567 89"]
    for s in samples:
        ids = tok.encode(s)
        assert ids == enc.encode_ordinary(s)
        assert enc.decode(ids) == s

def test_runs_out_of_pairs_and_empty_inputs():
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(["ab ab", ""], 1000)  # chunks "ab", " ab": 2 merges possible ((a,b), then (32, ab))
    assert tok.get_merges() == [(97, 98), (32, 256)]
    tok.train_from_iterator(iter([]), 500)
    assert tok.get_vocab_size() == 256 and len(tok.get_mergeable_ranks()) == 256

def _gen_then_fail():
    yield "fine text"
    raise RuntimeError("boom from the iterator")

@pytest.mark.parametrize("call, exc, match", [
    (lambda t: t.train_from_iterator(["a"], 255), ValueError, "vocab_size"),
    (lambda t: t.train_from_iterator(["a"], -5), ValueError, "vocab_size"),
    (lambda t: t.train_from_iterator(["a"], 2**24 + 1), ValueError, "vocab_size"),
    (lambda t: t.train_from_iterator(["a"], "300"), TypeError, "vocab_size"),
    (lambda t: t.train_from_iterator(["ok", 3], 300), TypeError, "item 1 is int"),
    (lambda t: t.train_from_iterator(["ok", b"bytes"], 300), TypeError, "item 1 is bytes"),
    (lambda t: t.train_from_iterator(["ok", None], 300, buffer_size=1), TypeError, "item 1 is NoneType"),
    (lambda t: t.train_from_iterator(42, 300), TypeError, "iterable of str"),
    (lambda t: t.train_from_iterator(["a"], 300, pattern="(unclosed"), ValueError, "invalid split pattern"),
    (lambda t: t.train_from_iterator(["a"], 300, pattern="[z-a]"), ValueError, "invalid split pattern"),
    (lambda t: t.train_from_iterator(["a"], 300, buffer_size=0), ValueError, "buffer_size"),
    (lambda t: t.train_from_iterator(["a"], 300, num_threads=0), ValueError, "num_threads"),
    (lambda t: t.train_from_iterator(_gen_then_fail(), 300), RuntimeError, "boom"),
])
def test_bad_inputs_raise_python_errors(call, exc, match):
    tok = rustbpe.Tokenizer()
    with pytest.raises(exc, match=match):
        call(tok)
    tok.train_from_iterator(["still usable after an error"], 260)  # no panic, the object still works
    assert tok.get_vocab_size() == 260

@pytest.mark.parametrize("text", ["a\ud800b c\udfff", "\ud83d\ude00 smile", "x\x00y", "<|bos|> special text", ""])
def test_trainer_takes_every_string_the_encoder_takes(text):
    """Tokenizer.train reads a str the way tiktoken's encoder does (lone surrogates -> U+FFFD, a surrogate pair ->
    its character), so training on a text yields merges that the encoder then uses on that same text."""
    from model.tokenizer import Tokenizer
    base = Tokenizer.train(["plain text"] * 4, vocab_size=300)
    expected = b"".join(base.enc.decode_single_token_bytes(t) for t in base.encode(text))
    tok = Tokenizer.train([text] * 50, vocab_size=300)
    assert b"".join(tok.enc.decode_single_token_bytes(t) for t in tok.encode(text)) == expected
    assert len(tok.encode(text)) <= max(1, len(text.split())) * 3  # trained merges apply: few tokens, not bytes
    assert rustbpe.split_texts([text])[0] == rustbpe.split_texts([expected.decode("utf-8")])[0]
