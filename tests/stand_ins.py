"""Stand-ins shared by tests that need a tokenizer but not a trained one."""
from model.tokenizer import SPECIAL_TOKENS


class ByteTokenizer:
    """model/tokenizer.py's surface over raw bytes: ids 0..255 are bytes, 256.. the special tokens (bos = 256)."""
    vocab_size = 256 + len(SPECIAL_TOKENS)
    bos_token_id = 256

    def encode(self, text, prepend=None, append=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])

    def encode_special(self, name):
        return 256 + SPECIAL_TOKENS.index(name)

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
