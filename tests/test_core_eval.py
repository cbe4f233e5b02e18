"""train/core_eval.py: CORE as nanochat computes it. A hand-made bundle scored by a scripted bigram model against
hand-computed accuracies; prompt rendering of one real row per dataset against hand-written strings; the embedded
sample against its README; and, when the shared real files are present, every raw task's row count, an oracle
model (teacher-forced on the gold prompt) at 1.0 and a guessing model at chance."""
import hashlib
import json
import math
import os
import random
import re
import socket
import time

import pytest
import torch
import torch.nn as nn

from model.common import UserError
from stand_ins import ByteTokenizer
from train import core_eval as ce
from train.tasks import realdata

pytestmark = pytest.mark.usefixtures("eager_single_thread")  # tiny shapes: one thread, no OpenMP spinning
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.environ.get("TRITONCHAT_REALDATA") or os.path.join(ROOT, "..", "shared", "realdata")
BUNDLE = os.environ.get("TRITONCHAT_EVAL_BUNDLE", "")  # an eval bundle folder (core.yaml, eval_data/), if at hand
needs_real = pytest.mark.skipif(not os.path.isdir(os.path.join(REAL, "core")),
                                reason=f"the shared real-data files are not at {REAL} (set TRITONCHAT_REALDATA)")
TOK = ByteTokenizer()
V = ByteTokenizer.vocab_size
SPACE, A = ord(" "), ord("a")

# ------------------------------------------------------------------------------------------------ scripted models
def bigram_table():
    """(V, V) logits: after " " or "a" the next token is "a", after anything else " " (+20 over the rest)."""
    w = torch.zeros(V, V)
    for c in range(V):
        w[c, A if c in (SPACE, A) else SPACE] = 20.0
    return w

class Bigram(nn.Module):
    """logits[b, t] depend on token t alone, so padding and batch shape cannot change them; counts its forwards."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, V)
        with torch.no_grad():
            self.emb.weight.copy_(bigram_table())
        self.forwards = 0

    def forward(self, idx):
        self.forwards += 1
        return self.emb(idx)

class Oracle(nn.Module):
    """Teacher-forced (+30 on the next input token) on rows whose text ends with a gold ending of some task item,
    uniform elsewhere: the gold choice has ~0 loss, the others log V."""

    def __init__(self, tasks):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.golds = set()
        for t in tasks:
            for it in t.items:
                if t.kind == ce.MULTIPLE_CHOICE:
                    self.golds.add(f"{it['query']}{t.delimiter}{it['choices'][it['gold']]}")
                elif t.kind == ce.SCHEMA:
                    self.golds.add(f"{it['context_options'][it['gold']]}{t.delimiter}{it['continuation']}")
                else:
                    self.golds.add(f"{it['context'].strip()}{t.delimiter}{it['continuation']}")
        self.by_tail = {}
        for g in self.golds:
            self.by_tail.setdefault(g[-12:], []).append(g)

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, V)
        nxt = torch.roll(idx, -1, 1)
        for b, row in enumerate(idx.tolist()):
            text = TOK.decode(row)
            if any(text.endswith(g) for g in self.by_tail.get(text[-12:], ())):
                logits[b].scatter_(1, nxt[b][:, None], 30.0)
        return logits

class Guess(nn.Module):
    """A random constant loss per row (token id 0, never in text, gets a random logit): the argmin over choices is a
    uniform guess; greedy predictions are token 0, so language modelling scores 0."""

    def __init__(self, seed=0):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, idx):
        logits = torch.zeros(idx.shape[0], 1, V)
        logits[:, :, 0] = 5 * torch.rand(idx.shape[0], 1, generator=self.gen)
        return logits.expand(*idx.shape, V)

# ------------------------------------------------------------------------------------------------ a hand-made bundle
MC_ITEMS = [  # delimiter "\nAnswer: " ends in a space, so the bigram model wants "a" then more "a"
    {"query": "Q: pick a", "choices": ["aaa", "bcd", "xyz", "abc"], "gold": 0},   # right
    {"query": "Q: again", "choices": ["bb", "aa", "cc", "dd"], "gold": 1},        # right
    {"query": "Q: trap", "choices": ["aa", "b", "c", "d"], "gold": 2},            # wrong (picks "aa")
    {"query": "Q: single", "choices": ["q", "r", "a", "s"], "gold": 2},           # right
]
SCHEMA_ITEMS = [  # the option's last character decides: "a" mispredicts the following space
    {"context_options": ["the cat sat on a", "the cat sat on b"], "continuation": "aa", "gold": 1},  # right
    {"context_options": ["x", "ya"], "continuation": "a", "gold": 0},                               # right
    {"context_options": ["b", "c"], "continuation": "zz", "gold": 1},   # equal losses: the first wins -> wrong
]
LM_ITEMS = [  # right when the stripped context ends in neither " " nor "a" and the continuation is all "a"
    {"context": "say a few ", "continuation": "aaa"},   # right
    {"context": "banana", "continuation": "aa"},        # wrong
    {"context": "hello", "continuation": "ab"},         # wrong
    {"context": "  ok  ", "continuation": "a"},         # right
]
# accuracies 3/4, 2/3, 2/4 against baselines 25 %, 50 %, 0 %: centred 2/3, 1/3, 1/2, CORE 1/2
EXPECTED = {"pick_a": (0.75, 2 / 3), "fill_in": (2 / 3, 1 / 3), "say_a": (0.5, 0.5)}
CORE_YAML = """# a toy bundle in the eval bundle's layout
icl_tasks:
- label: pick_a
  dataset_uri: toy/mc.jsonl # one few-shot example
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
-
  label: fill_in
  dataset_uri: toy/schema.jsonl
  num_fewshot: [0]
  icl_task_type: schema
- label: say_a
  dataset_uri: toy/lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
  early_stopping_criteria:
    - "\\n\\n"
    - 'Q:'
"""

def write_bundle(root, mc=MC_ITEMS):
    os.makedirs(os.path.join(root, "eval_data", "toy"), exist_ok=True)
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write(CORE_YAML)
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
                "pick_a,toy,multiple choice,1,4,25,,\"picks, with a comma\"\nfill_in,toy,schema,0,3,50,,x\n"
                "say_a,toy,language modeling,0,4,0,,x\n")
    for name, items in (("mc", mc), ("schema", SCHEMA_ITEMS), ("lm", LM_ITEMS)):
        with open(os.path.join(root, "eval_data", "toy", f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(it) + "\n" for it in items))
    return str(root)

@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path)

def test_bundle_core_equals_hand_computed_value(bundle):
    tasks = ce.load_bundle(bundle)
    assert [t.items for t in ce.load_tasks(bundle)] == [t.items for t in tasks]
    assert [(t.name, t.kind, t.num_fewshot, t.delimiter, t.baseline) for t in tasks] == [
        ("pick_a", ce.MULTIPLE_CHOICE, 1, "\nAnswer: ", 0.25), ("fill_in", ce.SCHEMA, 0, " ", 0.5),
        ("say_a", ce.LANGUAGE_MODELING, 0, " ", 0.0)]
    lines = []
    result = ce.evaluate_core(Bigram(), TOK, tasks, log=lines.append)
    assert result["name"] == "CORE"
    for name, (acc, centred) in EXPECTED.items():
        assert result["tasks"][name]["accuracy"] == pytest.approx(acc, abs=1e-12)
        assert result["tasks"][name]["centered"] == pytest.approx(centred, abs=1e-12)
    assert result["score"] == pytest.approx(0.5, abs=1e-12)
    assert [r["n"] for r in result["tasks"].values()] == [4, 3, 4]
    assert len(lines) == 4 and "items/s" in lines[0] and "centred +0.6667" in lines[0]
    assert ce.format_results(result).splitlines()[-1].split() == ["CORE", "0.5000"]

def test_batching_does_not_change_the_score(bundle):
    tasks = ce.load_bundle(bundle)
    one = ce.evaluate_core(Bigram(), TOK, tasks, batch_size=1, log=None)
    many = ce.evaluate_core(Bigram(), TOK, tasks, batch_size=64, log=None)
    tight = ce.evaluate_core(Bigram(), TOK, tasks, batch_size=64, max_batch_tokens=40, log=None)
    accuracies = [{k: r["accuracy"] for k, r in x["tasks"].items()} for x in (one, many, tight)]
    assert accuracies[0] == accuracies[1] == accuracies[2]
    assert one["score"] == many["score"] == tight["score"]

def test_a_real_gpt_runs_and_crops_to_max_seq_len(bundle):
    from model.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    tasks = ce.load_bundle(bundle)
    full = ce.evaluate_core(model, TOK, tasks, log=None)
    cropped = ce.evaluate_core(model, TOK, tasks, max_seq_len=12, log=None)
    for r in (full, cropped):
        assert all(0 <= t["accuracy"] <= 1 for t in r["tasks"].values()) and math.isfinite(r["score"])
    assert model.training  # evaluate_core restores the mode it found

# ------------------------------------------------------------------------------------------------ the pieces
def test_templates():
    shot = {"query": "Q1", "choices": ["a", "b"], "gold": 0}
    assert ce.render_mc({"query": "Q2", "choices": ["x", "y"], "gold": 1}, "\nAnswer: ", [shot]) == [
        "Q1\nAnswer: a\n\nQ2\nAnswer: x", "Q1\nAnswer: a\n\nQ2\nAnswer: y"]
    shot = {"context_options": ["A1", "A2"], "continuation": "c1", "gold": 1}
    assert ce.render_schema({"context_options": ["B1", "B2"], "continuation": "c2", "gold": 0}, " ", [shot]) == [
        "A2 c1\n\nB1 c2", "A2 c1\n\nB2 c2"]
    shot = {"context": " c1 ", "continuation": "w1"}
    assert ce.render_lm({"context": "ctx  ", "continuation": "word"}, " ", [shot]) == [
        "c1 w1\n\nctx", "c1 w1\n\nctx word"]
    assert ce.render_lm({"context": "Q", "continuation": "4"}, "\nAnswer: ", []) == ["Q\nAnswer:", "Q\nAnswer: 4"]

def test_sampling_follows_nanochat_seeds():
    for index, n, k in [(0, 11, 10), (5, 11, 10), (10, 11, 10), (3, 500, 10), (499, 500, 3), (7, 20, 0)]:
        others = [i for i in range(n) if i != index]
        assert ce.fewshot_indices(index, n, k) == random.Random(1234 + index).sample(others, k)
    items = list(range(50))
    shuffled = list(items)
    random.Random(1337).shuffle(shuffled)
    assert ce.subsample(items) == shuffled and ce.subsample(items, 7) == shuffled[:7]
    assert ce.subsample(items, -1) == shuffled

def test_scored_spans_prefix_suffix_and_crop():
    rows, s, e = ce.scored_spans(ce.MULTIPLE_CHOICE, [[256, 1, 2, 3], [256, 1, 2, 4, 5], [256, 1, 9]])
    assert (s, e) == ([2, 2, 2], [4, 5, 3])
    rows, s, e = ce.scored_spans(ce.SCHEMA, [[256, 7, 1, 2], [256, 8, 8, 1, 2]])
    assert (s, e) == ([2, 3], [4, 5])
    rows, s, e = ce.scored_spans(ce.LANGUAGE_MODELING, [[256, 5], [256, 5, 6, 7]])
    assert (rows, s, e) == ([[256, 5, 6, 7]], [2], [4])
    with pytest.raises(ValueError):
        ce.scored_spans(ce.LANGUAGE_MODELING, [[256, 5, 9], [256, 5, 6, 7]])
    assert ce.crop([[256, 1, 2, 3, 4]], [3], [5], 3) == ([[2, 3, 4]], [1], [3])
    with pytest.raises(ValueError):
        ce.crop([[256, 1, 2, 3, 4]], [2], [5], 3)

def test_icl_tasks_parse(bundle):
    tasks = ce._read_icl_tasks(os.path.join(bundle, "core.yaml"))
    assert [t["label"] for t in tasks] == ["pick_a", "fill_in", "say_a"]
    assert tasks[0]["continuation_delimiter"] == "\nAnswer: " and tasks[0]["num_fewshot"] == [1]
    assert tasks[2]["early_stopping_criteria"] == ["\n\n", "Q:"]

@pytest.mark.parametrize("text, words", [("icl_tasks: [unclosed", "not valid YAML"),
                                         ("other: 1\n", "no icl_tasks list"), ("- a list\n", "no icl_tasks list")])
def test_a_broken_core_yaml_is_a_user_error(tmp_path, text, words):
    (tmp_path / "core.yaml").write_text(text)
    with pytest.raises(UserError, match=words):
        ce._read_icl_tasks(str(tmp_path / "core.yaml"))

def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no core.yaml"):
        ce.load_bundle(str(tmp_path))
    root = write_bundle(tmp_path / "b", mc=MC_ITEMS[:1])
    with pytest.raises(UserError, match="1-shot needs at least 2 items"):
        ce.evaluate_core(Bigram(), TOK, ce.load_bundle(root), log=None)
    bad = write_bundle(tmp_path / "c", mc=[{"query": "q", "choices": ["a", "b"], "gold": 2}])
    with pytest.raises(UserError, match="mc.jsonl:1: not a multiple_choice item: gold 2"):
        ce.load_bundle(bad)
    with pytest.raises(UserError, match="no raw CORE dataset files"):
        ce.load_raw(str(tmp_path))

# ------------------------------------------------------------------------------------------------ real rows
def sample_row(name, **match):
    return next(r for r in realdata.sample_rows(name) if all(r.get(k) == v for k, v in match.items()))

def first_prompt(label, row):
    spec = next(t for t in ce.RAW_TASKS if t.label == label)
    item = spec.render(row)
    return item, ce.RENDER[spec.kind](item, spec.delimiter)[0]

def test_real_rows_render_as_the_bundle_does():
    item, p = first_prompt("arc_easy", sample_row("core/arc_easy_validation", id="NYSEDREGENTS_2014_8_22"))
    assert item["gold"] == 2 and p == "Question: One example of matter is\nAnswer: magnetism"  # labels "1".."4"
    item, p = first_prompt("arc_challenge", sample_row("core/arc_challenge_validation", id="NYSEDREGENTS_2014_4_4"))
    assert item["gold"] == 0 and p == ("Question: Which state of matter has no definite volume and no definite "
                                       "shape?\nAnswer: gas")
    item, p = first_prompt("copa", sample_row("core/copa_validation", idx=32))
    assert item == {"query": "I coughed, because", "choices": ["i inhaled smoke.", "i lowered my voice."], "gold": 0}
    assert p == "I coughed, because i inhaled smoke."
    item, p = first_prompt("commonsense_qa", sample_row("core/commonsense_qa_validation",
                                                        id="597d2a1c9df7962218d8b807df1f8212"))
    assert item["gold"] == 3 and item["choices"] == ["A", "B", "C", "D"]  # answer E: "park" (B) is dropped
    assert p == "Question: What blocks sunshine?\nChoices:\nA. summer\nB. desktop\nC. sea\nD. moon\nAnswer: A"
    item, p = first_prompt("piqa", sample_row("core/piqa_validation", goal="soap"))
    assert item["choices"] == ["can clean mold", "can clean a car"] and item["gold"] == 1
    assert p == "Question: soap\n\nAnswer: can clean mold"
    item, p = first_prompt("openbook_qa", sample_row("core/openbookqa_validation", id="9-106"))
    assert item["gold"] == 1 and p == "Plants need light for love"
    item, prompts = first_prompt("winogrande", sample_row("core/winogrande_validation", option1="garden",
                                                          option2="plant", answer="2"))
    assert item["gold"] == 1 and item["continuation"] == "is big."
    assert prompts == "John decided to grow a new breed of plant in his garden but the garden is big."
    item, p = first_prompt("boolq", sample_row("core/boolq_validation",
                                               question="is there a sequal to avengers infinity war"))
    assert item["gold"] == 1 and p == ("Passage: The untitled Avengers film is scheduled to be released in the United "
                                       "States on May 3, 2019, in IMAX and 3D.\nQuestion: is there a sequal to "
                                       "avengers infinity war?\nAnswer: no")
    row = sample_row("core/lambada_openai_test", id=992)
    item = ce.render_lambada(row)
    assert item["continuation"] == "bar"
    assert ce.render_lm(item, " ")[1].endswith('"How come I have to take the bar')
    assert ce.render_lm(item, " ")[0] == row["context"]
    item, p = first_prompt("hellaswag", sample_row("core/hellaswag_validation", ind=15))
    assert item["gold"] == 0
    assert p == ("Personal Care and Style: How to do a multicolored french manicure. Prepare your nails. It is "
                 "important to start with clean and unpainted nails. If you have any nail polish on already, remove "
                 "it with a cotton pad and nail polish remover. Then, trim your nails if they are broken or uneven. "
                 "Once you have done this, wash your hands and prepare to paint.")
    assert item["choices"][2] == (" If you are worried about the color or the effort it takes, you can always start "
                                  "with one of four natural colors: light pink, dark pink, and light green.. Layer "
                                  "on two coats of the pink polish.")  # lm-evaluation-harness's cleanup, as is
    assert ce.render_boolq({"passage": "Any question left.", "question": "is it", "answer": False})["query"] == \
        "Passage: Any\nQuestion left.\nQuestion: is it?"  # the bundle file's rewrite, kept

def readme_counts(path):
    with open(path) as f:
        return {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^\| (\S+)\.jsonl \| (\d+) \| (\d+) \|", f.read(),
                                                                  re.M)}

def test_embedded_sample_matches_its_readme_and_manifest():
    counts = readme_counts(os.path.join(realdata.SAMPLE_DIR, "README.md"))
    manifest = realdata.manifest()
    assert list(counts) == [s.name for s in realdata.SOURCES] == list(manifest["files"])
    total = 0
    for name, (rows, source_rows) in counts.items():
        f = manifest["files"][name]
        with open(realdata.sample_path(name), "rb") as fh:
            data = fh.read()
        total += len(data)
        assert (f["rows"], f["source_rows"]) == (rows, source_rows) and len(f["indices"]) == rows
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        assert len(realdata.sample_rows(name)) == rows == min(100, source_rows)
    assert total < 1_000_000
    tasks = ce.load_raw(realdata.SAMPLE_DIR)
    assert [t.items for t in ce.load_tasks(realdata.SAMPLE_DIR)] == [t.items for t in tasks]
    assert [t.name for t in tasks] == [t.label for t in ce.RAW_TASKS] and all(len(t.items) == 100 for t in tasks)
    assert ce.core_name(tasks) == "CORE-10" and ce.core_name(tasks[:3]) == "CORE-3"
    with pytest.raises(UserError, match="unknown raw CORE task"):
        ce.load_raw(realdata.SAMPLE_DIR, names=["mmlu"])

def test_sample_oracle_scores_one():
    tasks = ce.load_raw(realdata.SAMPLE_DIR, max_per_task=15)
    result = ce.evaluate_core(Oracle(tasks), TOK, tasks, log=None)
    assert result["name"] == "CORE-10" and result["score"] == 1.0

# ------------------------------------------------------------------------------------------------ full real files
@pytest.fixture(scope="module")
def real_tasks():
    return ce.load_raw(REAL)

@needs_real
def test_raw_tasks_load_with_the_documented_row_counts(real_tasks):
    assert {t.name: len(t.items) for t in real_tasks} == {t.label: t.rows for t in ce.RAW_TASKS}
    assert ce.core_name(real_tasks) == "CORE-10"

@needs_real
def test_oracle_scores_one_on_every_task(real_tasks):
    tasks = [ce.Task(**{**t.__dict__, "items": t.items[:30]}) for t in real_tasks]
    result = ce.evaluate_core(Oracle(tasks), TOK, tasks, log=None)
    assert {k: r["accuracy"] for k, r in result["tasks"].items()} == {t.name: 1.0 for t in tasks}
    assert result["score"] == 1.0

@needs_real
def test_guessing_scores_chance(real_tasks):
    n = 120
    result = ce.evaluate_core(Guess(), TOK, real_tasks, max_per_task=n, log=None)
    for t in real_tasks:
        items = t.items[:n]
        chance = 0.0 if t.kind == ce.LANGUAGE_MODELING else sum(
            1 / len(it.get("choices", it.get("context_options"))) for it in items) / len(items)
        acc = result["tasks"][t.name]["accuracy"]
        assert abs(acc - chance) <= 3 * math.sqrt(chance * (1 - chance) / len(items)) + 1e-12, (t.name, acc, chance)
        if t.name not in ("boolq", "commonsense_qa"):  # DCLM's baselines there: majority class, 1/5 of 5 options
            assert abs(chance - t.baseline) < 0.01, t.name

@needs_real
def test_draw_reproduces_the_sample(tmp_path):
    from train.tasks.realdata.draw import draw
    result = draw(REAL, str(tmp_path))
    assert result == realdata.manifest()
    with open(os.path.join(realdata.SAMPLE_DIR, "README.md")) as a, open(tmp_path / "README.md") as b:
        assert a.read() == b.read()

@needs_real
@pytest.mark.skipif(not os.path.isdir(os.path.join(BUNDLE, "eval_data")),
                    reason="no eval bundle (set TRITONCHAT_EVAL_BUNDLE to a folder holding eval_data/)")
@pytest.mark.parametrize("label, uri", [("copa", "commonsense_reasoning/copa.jsonl"),
                                        ("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl"),
                                        ("piqa", "commonsense_reasoning/piqa.jsonl"),
                                        ("winogrande", "language_understanding/winogrande.jsonl"),
                                        ("boolq", "reading_comprehension/boolq.jsonl")])
def test_raw_renderings_equal_the_bundle_rows(label, uri):
    spec = next(t for t in ce.RAW_TASKS if t.label == label)
    mine = [spec.render(r) for r in realdata.read_rows(os.path.join(REAL, "core", spec.stem + ".parquet"))]
    with open(os.path.join(BUNDLE, "eval_data", uri)) as f:
        assert mine == [json.loads(line) for line in f if line.strip()]

# ------------------------------------------------------------------------------------------------ two ranks
def _rank_main(rank, world, port, root, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = Bigram()
        fully_shard(model)  # every forward all-gathers: a rank that skipped one would hang the other
        result = ce.evaluate_core(model, TOK, ce.load_bundle(root), batch_size=1, log=None)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"score": result["score"], "forwards": model.forwards,
                       "acc": {k: r["accuracy"] for k, r in result["tasks"].items()}}, f)
    finally:
        dist.destroy_process_group()

def test_two_ranks_fsdp_match_one_process(tmp_path):
    import torch.multiprocessing as mp
    mc = MC_ITEMS + [dict(MC_ITEMS[0], query="Q: fifth")]  # 5 items: 3 on rank 0, 2 on rank 1
    root = write_bundle(tmp_path / "bundle", mc=mc)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank_main, args=(2, port, root, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 150
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("two-rank CORE evaluation hung")
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    single = ce.evaluate_core(Bigram(), TOK, ce.load_bundle(root), batch_size=1, log=None)
    assert ranks[0]["acc"] == ranks[1]["acc"] == {k: r["accuracy"] for k, r in single["tasks"].items()}
    assert ranks[0]["score"] == ranks[1]["score"] == single["score"]
    assert ranks[0]["forwards"] == ranks[1]["forwards"]
