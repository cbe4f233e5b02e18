"""Train the tokenizer on the embedded corpus and report its compression on held-out text.

    python -m train.tokenizer                                  # vocab 65536 on the embedded Shakespeare corpus
    python -m train.tokenizer --vocab-size 4096 --max-chars 1000000

Corpus: `load_corpus("train")`, documents capped at --doc-cap characters, stopped after --max-chars (nanochat: 2 B
characters of FineWeb-Edu); held-out: `load_corpus("val")`. Single process (rustbpe uses every core).
"""
import os
import time

from model.common import ArgumentParser, home_dir, int_at_least, print0, run_main
from model.tokenizer import SPECIAL_TOKENS, Tokenizer
from train.data import load_corpus

def bytes_per_token(tok, docs):
    ids = tok.encode(list(docs))
    return sum(len(d.encode("utf-8")) for d in docs) / max(1, sum(len(x) for x in ids))

def capped_docs(docs, max_chars=None, doc_cap=10_000):
    """Yield documents cut to doc_cap characters until max_chars characters were yielded in total."""
    total = 0
    for doc in docs:
        if max_chars is not None and total >= max_chars:
            return
        doc = doc[:doc_cap][:None if max_chars is None else max_chars - total]
        total += len(doc)
        yield doc

def train_tokenizer(vocab_size=65536, max_chars=None, doc_cap=10_000, out_dir=None, num_threads=None):
    """Train, save and evaluate; returns (tokenizer, stats dict)."""
    docs, val_docs = list(capped_docs(load_corpus("train"), max_chars, doc_cap)), load_corpus("val")
    t0 = time.perf_counter()
    tok = Tokenizer.train(iter(docs), vocab_size, num_threads=num_threads)
    train_s = time.perf_counter() - t0
    out_dir = out_dir or os.path.join(home_dir(), "tokenizer")
    tok.save(out_dir)
    return tok, {"vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size, "train_chars": sum(map(len, docs)),
                 "train_seconds": round(train_s, 3), "val_bytes_per_token": round(bytes_per_token(tok, val_docs), 4),
                 "train_bytes_per_token": round(bytes_per_token(tok, docs[:200]), 4), "dir": out_dir}

def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab-size", type=int_at_least(256 + len(SPECIAL_TOKENS)), default=65536,
                   help="total vocabulary incl. 256 bytes + 9 specials")
    p.add_argument("--max-chars", type=int_at_least(1), help="characters of training text (default: all)")
    p.add_argument("--doc-cap", type=int_at_least(1), default=10_000, help="characters kept of each document")
    p.add_argument("--num-threads", type=int_at_least(1), help="rustbpe threads (default: all cores)")
    p.add_argument("--out", default=None, help="output directory (default: $TRITONCHAT_HOME/tokenizer)")
    args = p.parse_args(argv)
    tok, s = train_tokenizer(args.vocab_size, args.max_chars, args.doc_cap, args.out, args.num_threads)
    note = "" if s["vocab_size"] == args.vocab_size else f" (the corpus ran out of pairs before {args.vocab_size})"
    print0(f"trained on {s['train_chars']:,} chars in {s['train_seconds']:.2f} s: vocab {s['vocab_size']:,}{note}")
    print0(f"bytes/token: held-out {s['val_bytes_per_token']:.3f}, train {s['train_bytes_per_token']:.3f}")
    print0(f"saved to {s['dir']}")
    return s

if __name__ == "__main__":
    run_main(main)
