"""The tritonchat tokenizer: byte-level BPE trained by `rustbpe` (Rust), encoded and decoded by `tiktoken`.

Ids: the 256 bytes, the learned merges in order (rank = id), then the 9 special tokens; vocab_size counts all of them
(training learns fewer merges if the corpus runs out of pairs). Saved as tokenizer.tiktoken (base64 token + rank) +
tokenizer.json. Chat format (as nanochat): <|bos|> then per turn <|user_start|> text <|user_end|> or
<|assistant_start|> parts <|assistant_end|>; a part is text, a tool call <|python_start|> code <|python_end|>, or the
tool's answer <|output_start|> output <|output_end|>. The loss mask is 1 on what the model must produce (assistant
text, python calls with their delimiters, <|assistant_end|>), 0 elsewhere (tool outputs are forced by the engine).
"""
import base64
import json
import os
from pathlib import Path

import tiktoken

from model.common import home_dir

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
# GPT-4's split pattern, numbers in groups of 1-2 (nanochat); the same string as rustbpe.GPT4_PATTERN.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
RANKS_FILE, META_FILE = "tokenizer.tiktoken", "tokenizer.json"
FORMAT = "tritonchat-tokenizer-1"

class Tokenizer:
    """A tiktoken Encoding with the learned ranks and SPECIAL_TOKENS appended after them."""

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)) or n < 256:
            raise ValueError(f"mergeable ranks must be the ids 0..n-1 with n >= 256 (got {n} ranks)")
        self.pattern, self.mergeable_ranks = pattern, mergeable_ranks
        self.special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="tritonchat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens["<|bos|>"]

    @classmethod
    def train(cls, texts, vocab_size, pattern=None, num_threads=None, buffer_size=8192):
        """Train with rustbpe on an iterable of str. vocab_size includes the 256 bytes and the 9 special tokens."""
        import tritonchat_rustbpe as rustbpe  # the Rust trainer in rustbpe/, built by `make install` (maturin)
        if isinstance(texts, str):
            raise TypeError("Tokenizer.train expects an iterable of str (documents), not one str")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=pattern or SPLIT_PATTERN,
                                buffer_size=buffer_size, num_threads=num_threads)
        return cls(dict(bpe.get_mergeable_ranks()), bpe.get_pattern())

    def save(self, directory):
        """Write tokenizer.tiktoken (tiktoken's `base64(token) rank` lines) and tokenizer.json, each atomically."""
        os.makedirs(directory, exist_ok=True)
        ranks = "".join(f"{base64.b64encode(tok).decode()} {rank}\n"
                        for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))
        meta = {"format": FORMAT, "pattern": self.pattern, "special_tokens": self.special_tokens,
                "vocab_size": self.vocab_size}
        for name, text in ((RANKS_FILE, ranks), (META_FILE, json.dumps(meta, indent=1) + "\n")):
            tmp = Path(directory, name + ".tmp")
            tmp.write_text(text)
            tmp.replace(os.path.join(directory, name))

    @classmethod
    def load(cls, directory):
        ranks_path, meta_path = os.path.join(directory, RANKS_FILE), os.path.join(directory, META_FILE)
        if missing := [name for name in (RANKS_FILE, META_FILE) if not os.path.exists(os.path.join(directory, name))]:
            raise FileNotFoundError(f"no tokenizer at {directory} ({missing[0]} missing); "
                                    f"train one with `python -m train.tokenizer`")
        meta = json.loads(Path(meta_path).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: unknown tokenizer format {meta.get('format')!r} (expected {FORMAT})")
        ranks = {}
        with open(ranks_path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        tok, rank = line.split()
                        ranks[base64.b64decode(tok)] = int(rank)
                    except ValueError as e:
                        raise ValueError(f"{ranks_path}:{lineno}: malformed line {line.strip()!r}") from e
        tok = cls(ranks, meta["pattern"])
        if meta.get("special_tokens") != tok.special_tokens:
            raise ValueError(f"{meta_path}: special tokens {meta.get('special_tokens')} do not match this version's "
                             f"{tok.special_tokens}")
        return tok

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode_special(self, name):
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; the special tokens are {SPECIAL_TOKENS}")
        return self.special_tokens[name]

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int]; list[str] -> list[list[int]] (tiktoken's threaded batch). Special-token text in the
        input is encoded as ordinary text, never as the special token. prepend/append: a token id or special name."""
        pre, post = ([] if t is None else [self.encode_special(t) if isinstance(t, str) else int(t)]
                     for t in (prepend, append))
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        return [pre + ids + post for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def token_bytes(self):
        """list[int] (vocab_size,): every token's exact byte length (0 for special tokens), for bits per byte."""
        special = set(self.special_tokens.values())
        return [0 if i in special else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)]

    def render_conversation(self, conversation, max_tokens=2048):
        """-> (ids, mask), both lists of the same length, truncated to max_tokens (None: no limit)."""
        ids, mask, sp = [self.bos_token_id], [0], self.special_tokens
        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))
        # part type -> (tokens before, tokens after, mask); python_output is the tool's, forced by the engine
        wrap = {"text": ([], [], 1), "python": ([sp["<|python_start|>"]], [sp["<|python_end|>"]], 1),
                "python_output": ([sp["<|output_start|>"]], [sp["<|output_end|>"]], 0)}
        for m in conversation_messages(conversation):
            if m["role"] == "user":
                add([sp["<|user_start|>"]] + self.encode(_text(m["content"])) + [sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            for part in m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]:
                before, after, learn = wrap[part["type"]]
                add(before + self.encode(part["text"]) + after, learn)
            add([sp["<|assistant_end|>"]], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation):
        """Engine prompt: the conversation (less a final assistant answer, as nanochat) + <|assistant_start|>."""
        messages = conversation_messages(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError("render_for_completion needs a user message to answer")
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=None)
        return ids + [self.special_tokens["<|assistant_start|>"]]

def conversation_messages(conversation):
    """A conversation {"messages": [{"role": system | user | assistant, "content": str or [{"type": text | python |
    python_output, "text": str}]}]} checked (python parts: assistant only; a system message only first; turns
    alternate user, assistant, ...) -> its messages, a system message merged into the first user message.
    ValueError naming the message (and part). Needs no tokenizer: task loaders check their rows with it."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        keys = f" with keys {list(conversation)}" if isinstance(conversation, dict) else ""
        raise ValueError(f'a conversation must be a dict {{"messages": [...]}}, got {type(conversation).__name__}'
                         f"{keys}")
    messages = conversation["messages"]
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'message {i} must be a dict with "role" and "content", got {m!r:.200}')
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {m['role']!r} (system, user or assistant)")
        content = m["content"]
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                    raise ValueError(f'message {i} part {j}: a part is {{"type": ..., "text": str}}, '
                                     f"got {part!r:.200}")
                if part.get("type") not in ("text", "python", "python_output"):
                    raise ValueError(f"message {i} part {j}: unknown part type {part.get('type')!r} "
                                     f"(text, python or python_output)")
                if m["role"] != "assistant" and part["type"] != "text":
                    raise ValueError(f"message {i} part {j}: only assistant messages hold {part['type']} parts")
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a str or a list of parts, got {type(content).__name__}")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        merged = _text(messages[0]["content"]) + "\n\n" + _text(messages[1]["content"])
        messages = [dict(messages[1], content=merged)] + messages[2:]
    for i, m in enumerate(messages):
        expected = ("user", "assistant")[i % 2]
        if m["role"] == "system":
            raise ValueError(f"message {i}: a system message may only come first")
        if m["role"] != expected:
            raise ValueError(f"message {i} (after merging a system message) has role {m['role']!r}, expected "
                             f"{expected!r}: turns alternate user, assistant, user, ...")
    return messages

def _text(content):
    return content if isinstance(content, str) else "".join(part["text"] for part in content)

def get_tokenizer(directory=None):
    """The trained tokenizer at $TRITONCHAT_HOME/tokenizer (or `directory`)."""
    return Tokenizer.load(directory or os.path.join(home_dir(), "tokenizer"))

class IncrementalDecoder:
    """Streaming decode: add(token) -> the newly completed text ("" while a UTF-8 character is incomplete), flush()
    -> the rest (U+FFFD for an incomplete character); `ids`: every id added. The tokenizer needs only decode(ids)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0  # sent: characters already handed out

    def add(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._take(text)  # U+FFFD: maybe a character missing bytes

    def flush(self):
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, text):
        new = text[self.sent:]
        self.sent = len(text)
        return new
