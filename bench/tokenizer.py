"""Tokenizer benchmark: BPE training time, encode throughput and compression.

    python -m bench.tokenizer            # full: whole embedded corpus, vocab 65536 and 8192 (a few CPU minutes)
    python -m bench.tokenizer --quick    # 500 kB of it, vocab 512

Training (same corpus, split pattern and vocab size incl. the 256 bytes; median of a few runs of the training call
alone): "ours" = `tritonchat_rustbpe`; "pypi_rustbpe" = nanochat's `rustbpe`, a PyPI wheel only (`pip install
--only-binary :all: --target $TRITONCHAT_HOME/bench/pypi_rustbpe rustbpe`: no sdist build code runs) loaded in this
process (skipped with a note when it cannot be installed); "hf_tokenizers" = HuggingFace `tokenizers` byte-level BPE
with the same split regex, as nanochat compares. Encode: MB/s of UTF-8 text, our tiktoken Encoding vs the HF tokenizer,
one long string ("encode") and the documents in threads ("encode_batch"). Compression: bytes per token on the held-out
play. Training is CPU work: only --quick (or bench.kernels off-GPU) selects the small run.
"""
import bisect
import hashlib
import importlib.util
import itertools
import os
import random
import statistics
import subprocess
import sys
import time

import tiktoken
import tritonchat_rustbpe

from bench import harness
from model.common import home_dir

SUITE = "tokenizer"
PYPI_DIR = os.environ.get("TRITONCHAT_PYPI_RUSTBPE") or os.path.join(home_dir(), "bench", "pypi_rustbpe")

def load_texts(quick):
    """(train docs, held-out docs, corpus name): the embedded corpus, or a synthetic one when it is unavailable."""
    try:
        from train.data import load_corpus
        docs, val, name = load_corpus("train"), load_corpus("val"), "shakespeare"
    except Exception as e:  # noqa: BLE001 - no network / no cache: still exercise the code path
        print(f"[{SUITE}] embedded corpus unavailable ({type(e).__name__}: {e}); using a synthetic corpus")
        rng = random.Random(0)
        words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 9))) for _ in range(3000)]
        weights = [1 / (r + 1) for r in range(len(words))]
        make = lambda n: [" ".join(rng.choices(words, weights, k=300)) + "\n" for _ in range(n)]
        docs, val, name = make(2000), make(40), "synthetic"
    if quick:  # the first documents up to and including the one that reaches 500 kB
        docs = docs[:bisect.bisect_left(list(itertools.accumulate(map(len, docs))), 500_000) + 1]
    return docs, val, name

def _timed(make, fn, reps):
    """reps x (obj = make(), then fn(obj) timed) -> (wall s list, CPU s list, the last obj)."""
    times, cpu = [], []
    for _ in range(reps):
        obj = make()
        t0, c0 = time.perf_counter(), time.process_time()
        fn(obj)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu, obj

def train_bpe(module, docs, vocab, reps, pattern):
    """Train `reps` times with a rustbpe-API module: (wall s, CPU s, tiktoken Encoding, sha256 of the ranked merges)."""
    times, cpu, tok = _timed(module.Tokenizer, lambda t: t.train_from_iterator(iter(docs), vocab, pattern=pattern),
                             reps)
    ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
    enc = tiktoken.Encoding(module.__name__, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return times, cpu, enc, hashlib.sha256(b"".join(sorted(ranks, key=ranks.get))).hexdigest()

def import_pypi_rustbpe():
    """PyPI's `rustbpe`, installed once into PYPI_DIR and loaded by path beside ours, or None with a printed reason."""
    if not os.path.isdir(os.path.join(PYPI_DIR, "rustbpe")):
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary", ":all:",
               "--target", PYPI_DIR, "rustbpe"]
        try:
            err = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stderr.strip()[-300:]
        except (OSError, subprocess.TimeoutExpired) as e:
            err = f"could not run pip ({e})"
        if not os.path.isdir(os.path.join(PYPI_DIR, "rustbpe")):
            print(f"[{SUITE}] skipping pypi_rustbpe: `pip install --only-binary :all: --target {PYPI_DIR} rustbpe` "
                  f"failed: {err}")
            return None
    spec = importlib.util.spec_from_file_location("rustbpe", os.path.join(PYPI_DIR, "rustbpe", "__init__.py"))
    module = sys.modules["rustbpe"] = importlib.util.module_from_spec(spec)  # for its `from .rustbpe import *`
    spec.loader.exec_module(module)
    return module

def train_hf(docs, vocab, reps, pattern):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    def make():
        tk = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False, min_frequency=0, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        return tk, trainer

    times, cpu, (tk, _) = _timed(make, lambda m: m[0].train_from_iterator(docs, m[1]), reps)
    return times, cpu, tk

def run(quick=False):
    from model.tokenizer import SPLIT_PATTERN as pattern
    docs, val, corpus = load_texts(quick)
    vocabs, reps = ([512], 1) if quick else ([65536, 8192], 3)
    nbytes, val_bytes = (sum(len(d.encode("utf-8")) for d in texts) for texts in (docs, val))
    pypi, rows = import_pypi_rustbpe(), []
    ms = lambda times: statistics.median(times) * 1e3
    for vocab in vocabs:
        case = {"corpus": corpus, "corpus_mb": round(nbytes / 1e6, 2), "vocab": vocab}

        def add_train(provider, times, cpu, n_vocab, val_tokens, **extra):
            rows.append(harness.row(SUITE, case, provider, "train", ms(times), bytes_=nbytes, vocab_reached=n_vocab,
                                    val_bytes_per_token=val_bytes / val_tokens, **extra, times_s=times,
                                    cpu_s=statistics.median(cpu)))

        times, cpu, enc, digest = train_bpe(tritonchat_rustbpe, docs, vocab, reps, pattern)
        add_train("ours", times, cpu, enc.n_vocab, sum(map(len, enc.encode_ordinary_batch(val))))
        if pypi is not None:
            p_times, p_cpu, p_enc, p_digest = train_bpe(pypi, docs, vocab, reps, pattern)
            add_train("pypi_rustbpe", p_times, p_cpu, p_enc.n_vocab, sum(map(len, p_enc.encode_ordinary_batch(val))),
                      same_vocab_as_ours=p_digest == digest)
        hf_times, hf_cpu, hf = train_hf(docs, vocab, reps, pattern)
        add_train("hf_tokenizers", hf_times, hf_cpu, hf.get_vocab_size(), sum(len(e.ids) for e in hf.encode_batch(val)))
        # encode throughput: one long string (the first ~1 MB: HF is slow on huge strings), and the document list
        text = "".join(docs)[:1_000_000]
        assert enc.decode(enc.encode_ordinary(val[0])) == val[0] and hf.decode(hf.encode(val[0]).ids) == val[0]
        for pass_, nb, ours_fn, hf_fn in (
                ("encode", len(text.encode("utf-8")), lambda: enc.encode_ordinary(text), lambda: hf.encode(text)),
                ("encode_batch", nbytes, lambda: enc.encode_ordinary_batch(docs, num_threads=os.cpu_count()),
                 lambda: hf.encode_batch(docs))):
            for provider, fn in (("ours", ours_fn), ("hf_tokenizers", hf_fn)):
                t = ms(_timed(lambda: None, lambda _: fn(), reps)[0])
                rows.append(harness.row(SUITE, case, provider, pass_, t, bytes_=nb, mb_per_s=nb / 1e6 / (t * 1e-3),
                                        input_mb=round(nb / 1e6, 2)))
    harness.add_ratios(rows, "hf_tokenizers")  # ratio = HF time / this time (> 1: faster than HF)
    for peer in ("pypi_rustbpe", "hf_tokenizers"):  # ours vs each peer, in wall and CPU time (robust under load)
        by = {harness.case_key(r): r for r in rows if r["provider"] == peer}
        for r in (r for r in rows if r["provider"] == "ours"):
            p = by.get(harness.case_key(r))
            r[f"speedup_vs_{peer}"] = p["ms"] / r["ms"] if p else None
            if p and r.get("cpu_s") and p.get("cpu_s"):
                r[f"cpu_speedup_vs_{peer}"] = p["cpu_s"] / r["cpu_s"]
    return rows

def main(argv=None):
    args = harness.parser(__doc__.split("\n")[0], quick="500 kB of the corpus, vocab 512").parse_args(argv)
    info = harness.header(SUITE)
    info["note"] = f"tokenizer suite: {'quick' if args.quick else 'full'} CPU run; {os.cpu_count()} cores"
    rows = run(args.quick)
    harness.print_table(rows)
    keys = ("cpu_s", "vocab_reached", "val_bytes_per_token", "mb_per_s", "speedup_vs_pypi_rustbpe",
            "cpu_speedup_vs_pypi_rustbpe", "speedup_vs_hf_tokenizers", "cpu_speedup_vs_hf_tokenizers",
            "same_vocab_as_ours")
    for r in rows:
        extra = {k: r[k] for k in keys if r.get(k) is not None}
        print(f"  {r['provider']:14s} {r['pass']:12s} vocab={r['case']['vocab']:<6d} {r['ms'] / 1e3:8.3f} s  "
              + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    return harness.write_results(SUITE, rows, info, None, args.out, png=not args.no_png, quick=args.quick)

if __name__ == "__main__":
    main()
