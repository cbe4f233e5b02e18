"""model/tokenizer.py: round trips on awkward Unicode, save/load, special tokens, and conversation rendering with
masks checked token by token on hand-written conversations (tool use included)."""
import os
import random

import pytest

from model.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, IncrementalDecoder, Tokenizer, get_tokenizer
from stand_ins import CORPORA, ByteTokenizer, zipf_corpus

random.seed(0)

VOCAB = 512
POOL = ("abcxyz ABC 0123456789 .,;:!?'\"-()[]{}<>|/\\@#$%^&*_+=~`" + " \n\t\r\x00\x01\x07\x0b\x0c\x1b\x1f\x7f\x85\xa0"
        + "éüñßøÆ" + "\u0301\u0308\u0327\u20dd\u200d\ufe0f" + "日本語中文한국어" + "عربيहिन्दी" + "Ωπжщ"
        + "😀🦊👩💻🇫🇷🏽" + "\u2028\u3000\U0001d11e\U0010fffd")

@pytest.fixture(scope="module")
def tok():
    texts = zipf_corpus(300, seed=11) + CORPORA["unicode"] + CORPORA["english"]
    return Tokenizer.train(texts, VOCAB)

def random_strings(n, seed):
    rng = random.Random(seed)
    out = ["", " ", "\n", "\x00", "👩\u200d💻", "e\u0301\u0301\u0301", "<|bos|>", "<|assistant_end|> text"]
    out += ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    return out

def test_vocab_and_special_tokens(tok):
    assert tok.vocab_size == VOCAB
    n = VOCAB - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n, VOCAB))
    assert tok.bos_token_id == n == tok.get_bos_token_id()
    assert tok.pattern == SPLIT_PATTERN
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")

def test_round_trip_random_unicode(tok):
    nbytes = tok.token_bytes()
    for s in random_strings(300, seed=1):
        ids = tok.encode(s)
        assert all(0 <= i < VOCAB - len(SPECIAL_TOKENS) for i in ids)  # special-token text stays ordinary text
        assert tok.decode(ids) == s
        assert sum(nbytes[i] for i in ids) == len(s.encode("utf-8"))

def test_encode_batch_prepend_append(tok):
    texts = random_strings(50, seed=2)
    batch = tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"), num_threads=2)
    single = [tok.encode(t) for t in texts]
    end = tok.encode_special("<|assistant_end|>")
    assert batch == [[tok.bos_token_id] + ids + [end] for ids in single]
    assert tok.encode("hi", prepend=tok.bos_token_id) == [tok.bos_token_id] + tok.encode("hi")
    assert tok.encode([]) == []
    with pytest.raises(TypeError):
        tok.encode([b"bytes"])

def test_save_load_round_trip(tok, tmp_path, monkeypatch):
    tok.save(tmp_path / "t")
    assert sorted(os.listdir(tmp_path / "t")) == ["tokenizer.json", "tokenizer.tiktoken"]
    tok2 = Tokenizer.load(tmp_path / "t")
    assert tok2.vocab_size == tok.vocab_size and tok2.special_tokens == tok.special_tokens
    assert tok2.mergeable_ranks == tok.mergeable_ranks and tok2.pattern == tok.pattern
    for s in random_strings(50, seed=3):
        assert tok2.encode(s) == tok.encode(s)
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="train.tokenizer"):
        get_tokenizer()
    tok.save(tmp_path / "home" / "tokenizer")
    assert get_tokenizer().encode("hello there") == tok.encode("hello there")

def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], 260)  # < 256 bytes + 9 specials
    with pytest.raises(TypeError, match="iterable of str"):
        Tokenizer.train("one string", 300)
    with pytest.raises(TypeError, match="item 1"):
        Tokenizer.train(["ok", 5], 300)

def test_incremental_decoder_holds_split_characters(tok):
    text = "héllo wörld ✓ 日本語 😀🦊 e\u0301 👩\u200d💻"
    # bytes as tokens split every multi-byte character; the trained BPE splits some
    for tokenizer, ids in ((ByteTokenizer(), list(text.encode("utf-8"))), (tok, tok.encode(text))):
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.add(t) for t in ids]
        assert all("\ufffd" not in piece for piece in pieces)  # never half a character
        assert "".join(pieces) + decoder.flush() == text
        assert decoder.ids == ids
    decoder = IncrementalDecoder(ByteTokenizer())
    assert [decoder.add(b) for b in "😀".encode("utf-8")] == ["", "", "", "😀"]  # out with its 4th byte
    assert decoder.add(0xE2) == "" and decoder.flush() == "\ufffd"  # an incomplete tail is flushed as U+FFFD

# ---------------------------------------------------------------------------------------------------- conversations
def expected(tok, *segments):
    """segments: (special name or text, mask) -> (ids, mask), each text encoded on its own as the renderer does."""
    ids, mask = [], []
    for piece, m in segments:
        t = [tok.encode_special(piece)] if piece in SPECIAL_TOKENS else tok.encode(piece)
        ids += t
        mask += [m] * len(t)
    return ids, mask

def test_render_simple_conversation(tok):
    conv = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "Paris."},
                         {"role": "user", "content": "And of Italy?"},
                         {"role": "assistant", "content": "Rome, of course."}]}
    ids, mask = tok.render_conversation(conv)
    want = expected(tok, ("<|bos|>", 0), ("<|user_start|>", 0), ("What is the capital of France?", 0),
                    ("<|user_end|>", 0), ("<|assistant_start|>", 0), ("Paris.", 1), ("<|assistant_end|>", 1),
                    ("<|user_start|>", 0), ("And of Italy?", 0), ("<|user_end|>", 0), ("<|assistant_start|>", 0),
                    ("Rome, of course.", 1), ("<|assistant_end|>", 1))
    assert (ids, mask) == want
    assert tok.decode(ids).startswith("<|bos|><|user_start|>What is")

def test_render_tool_use_and_system_message(tok):
    conv = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "How much is 12 * 34?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12 * 34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "It is 408."}]}]}
    ids, mask = tok.render_conversation(conv)
    want = expected(tok, ("<|bos|>", 0), ("<|user_start|>", 0), ("You are terse.\n\nHow much is 12 * 34?", 0),
                    ("<|user_end|>", 0), ("<|assistant_start|>", 0), ("Let me compute. ", 1),
                    ("<|python_start|>", 1), ("12 * 34", 1), ("<|python_end|>", 1),
                    ("<|output_start|>", 0), ("408", 0), ("<|output_end|>", 0),
                    ("It is 408.", 1), ("<|assistant_end|>", 1))
    assert (ids, mask) == want
    assert conv["messages"][1]["content"] == "How much is 12 * 34?"  # the caller's conversation is not modified
    # truncation keeps ids and mask aligned
    ids8, mask8 = tok.render_conversation(conv, max_tokens=8)
    assert (ids8, mask8) == (ids[:8], mask[:8])
    # completion prompt: the final assistant answer is dropped, <|assistant_start|> appended
    prompt = tok.render_for_completion(conv)
    cut = ids.index(tok.encode_special("<|assistant_start|>"))
    assert prompt == ids[:cut + 1]
    assert tok.render_for_completion({"messages": conv["messages"][:2]}) == prompt

@pytest.mark.parametrize("conv, match", [
    ([{"role": "user", "content": "hi"}], "dict"),
    ({"msgs": []}, "messages"),
    ({"messages": []}, "at least one"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "expected 'assistant'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": "user", "content": 42}]}, "content must be"),
    ({"messages": [{"role": "system", "content": "s"}]}, "followed by a user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]}, "only come first"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "sql", "text": "x"}]}]}, "unknown part type"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "text"}]}]}, "part 0"),
    ({"messages": [{"role": "user", "content": [{"type": "python", "text": "1"}]}]}, "only assistant"),
])
def test_malformed_conversations(tok, conv, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(conv)
