"""What several test files share: a byte-level tokenizer stand-in, synthetic documents and corpora, a local HTTP
file server, parquet writing, and a plain reference Muon. Test files import from here, never from each other."""
import http.server
import os
import random
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kernels.newton_schulz import newton_schulz_reference
from model.gpt import GPT, GPTConfig
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

def synthetic_docs(n=300, seed=0):
    """n short documents of Shakespeare-ish words, each starting with its index ("12: to be or ...")."""
    rng = random.Random(seed)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    return [f"{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "." for i in range(n)]

def zipf_corpus(n_docs, seed, words_per_doc=60):
    """Documents from a Zipf-distributed vocabulary of made-up words, numbers and punctuation."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    vocab = ["".join(rng.choice(letters[: rng.randint(6, 26)]) for _ in range(rng.randint(1, 9)))
             for _ in range(400)]
    weights = [1 / (r + 1) for r in range(len(vocab))]
    docs = []
    for _ in range(n_docs):
        ws = rng.choices(vocab, weights, k=words_per_doc)
        for j in range(0, len(ws), 7):
            ws[j] = ws[j].capitalize() + rng.choice([",", ".", "", "", "'s", "!"])
        if rng.random() < 0.5:
            ws.append(str(rng.randint(0, 99999)))
        docs.append(" ".join(ws) + rng.choice(["\n", "\n\n", "  \n", ""]))
    return docs

CORPORA = {
    "english": ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world! Hello, hello; HELLO.",
                "It's what we've said: they'll do it, we're sure, I'd think, you'd be 12345 or 3.14159."],
    "repeats": ["aaaa aaa aa a aaaaaaa", "abababab ababa bab", "zzzz" * 10, "aaa" + "b" * 9],
    "unicode": ["naïve café — résumé", "日本語のテキスト、日本語！", "emoji 😀😀 👩‍💻 🇫🇷🇫🇷 ok",
                "Zalgo z̷a̶l̴g̸o", "Ελληνικά και русский текст", "tabs\tand\nnewlines\r\n  spaces   end"],
    "zipf": zipf_corpus(40, seed=1),
}

def write_parquet(path, docs, row_group_size=4):
    """docs as the "text" column of a parquet file (FineWeb's layout), row_group_size documents per row group."""
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size)

class LocalServer:
    """An HTTP server on 127.0.0.1 (a free port) in a thread, as a context manager; subclasses build a handler."""

    def serve(self, handler, path=""):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

class Server(LocalServer):
    """http.server on 127.0.0.1 serving `root`; `flaky` names fail once with 503; `requests` counts GETs per name.
    Honours `Range: bytes=N-` (206) when range_ok, like the Hugging Face CDN. A context manager."""

    def __init__(self, root, flaky=(), range_ok=True):
        self.root, self.flaky, self.requests, self.ranges = root, set(flaky), {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                outer.requests[name] = outer.requests.get(name, 0) + 1
                if name in outer.flaky:
                    outer.flaky.discard(name)
                    return self.send_error(503, "try again")
                path = os.path.join(outer.root, name)
                if not os.path.isfile(path):
                    return self.send_error(404)
                body = open(path, "rb").read()
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].rstrip("-")) if rng and range_ok else 0
                outer.ranges.append(start)
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *a):
                pass

        self.serve(Handler, "/files")

def straightforward_muon(params, grads_per_step, lr, momentum_per_step, nesterov=True):
    """Muon written out per matrix with explicit formulas (no lerp, no batching), fp64 bookkeeping."""
    params = [p.clone().double() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads, mom in zip(grads_per_step, momentum_per_step):
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            bufs[i] = mom * bufs[i] + (1 - mom) * g
            u = (1 - mom) * g + mom * bufs[i] if nesterov else bufs[i]
            o = newton_schulz_reference(u.float()).double()
            rows, cols = p.shape
            params[i] = p - lr * max(1.0, rows / cols) ** 0.5 * o
    return [p.float() for p in params]

def tiny_model(cls=GPT, seed=0):
    """A 2-layer GPT (GQA 4/2 heads, width 128, context 64) over ByteTokenizer's vocabulary, in eval mode, with the
    weights the init zeroes (lm_head, output projections) randomised so that logits differ between tokens."""
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=64, vocab_size=ByteTokenizer().vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=128)
    model = cls(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.05)
    return model.eval()
