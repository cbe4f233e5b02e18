"""Task loaders against fixture files served by a local http.server (never the internet), the GSM8K tool-call
conversion, the mixture, the embedded tasks, and every reward on right, wrong and malformed answers."""
import functools
import http.server
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stand_ins import LocalServer
from train.tasks import TaskError, build_mixture, get_task, parse_spec
from train.tasks.common import TaskMixture, extract_answer, hf_rows
from train.tasks.gsm8k import solution_parts
from train.tasks.humaneval import extract_program

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tasks")
# fixture file -> (repo, config, split) in Hugging Face's parquet-export layout
LAYOUT = {"smoltalk": ("HuggingFaceTB/smol-smoltalk", "default", "train"), "mmlu": ("cais/mmlu", "all", "test"),
          "mmlu_aux": ("cais/mmlu", "auxiliary_train", "train"), "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
          "gsm8k": ("openai/gsm8k", "main", "test"),
          "humaneval": ("openai/openai_humaneval", "openai_humaneval", "test")}

def by_question(task, question):
    """The example of a multiple-choice task with this question (real tasks present rows in a seeded order)."""
    return next(c for c in task if c["question"] == question)

def rows_of(name):
    with open(os.path.join(FIX, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]

class Quiet(http.server.SimpleHTTPRequestHandler):
    hits = []

    def log_message(self, *args):
        Quiet.hits.append(self.path)

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name, (repo, config, split) in LAYOUT.items():
        d = root / repo / "resolve" / "refs" / "convert" / "parquet" / config / split  # server unquotes %2F
        d.mkdir(parents=True)
        rows = rows_of(name)
        if name == "gsm8k":  # two shards, to check the 0000, 0001, ... 404-terminated walk
            pq.write_table(pa.Table.from_pylist(rows[:1]), d / "0000.parquet")
            pq.write_table(pa.Table.from_pylist(rows[1:]), d / "0001.parquet")
        else:
            pq.write_table(pa.Table.from_pylist(rows), d / "0000.parquet")
    (root / "files").mkdir()
    for f in os.listdir(FIX):
        (root / "files" / f).write_bytes(open(os.path.join(FIX, f), "rb").read())
    (root / "files" / "garbage.parquet").write_bytes(b"not a parquet file at all")
    srv = LocalServer()
    srv.serve(functools.partial(Quiet, directory=str(root)))
    old = {k: os.environ.get(k) for k in ("TRITONCHAT_DATA_URL", "TRITONCHAT_HOME")}
    os.environ["TRITONCHAT_DATA_URL"] = srv.url
    os.environ["TRITONCHAT_HOME"] = str(tmp_path_factory.mktemp("home"))
    with srv:
        yield srv.url
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

def test_loaders_download_parse_and_cache(server):
    st = get_task("smoltalk")
    assert len(st) == 3 and st[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    mm = get_task("mmlu", split="test")  # rows in the seeded order (train/tasks/common.py): found by content
    two = by_question(mm, "What is 2 + 3?")
    assert len(mm) == 3 and two["messages"][1]["content"] == "B" and two["letters"] == ("A", "B", "C", "D")
    assert "- 5=B\n" in two["messages"][0]["content"]
    aux = get_task("mmlu_aux")
    assert len(aux) == 2 and aux[0]["messages"][1]["content"] == "B"
    arc = get_task("arc_easy", split="test")
    assert by_question(arc, "Which of these is a source of light?")["messages"][1]["content"] == "B"
    plants = by_question(arc, "What do plants need to make food?")
    assert plants["messages"][1]["content"] == "A" and plants["letters"] == ("A", "B", "C")  # "1" -> A
    gsm = get_task("gsm8k", split="test")
    assert len(gsm) == 2  # both shards
    he = get_task("humaneval")
    assert sorted(c["entry_point"] for c in he) == ["add", "double"]
    # second load is served from the cache: no new HTTP requests
    Quiet.hits.clear()
    assert len(get_task("gsm8k", split="test")) == 2 and Quiet.hits == []

def test_files_option_jsonl_and_bad_files(server):
    mm = get_task("mmlu", split="test", files=[f"{server}/files/mmlu.jsonl"])
    assert len(mm) == 3
    with pytest.raises(TaskError, match="broken.jsonl"):
        hf_rows("x", "y", "z", files=[f"{server}/files/broken.jsonl"])
    with pytest.raises(TaskError, match="garbage.parquet"):
        hf_rows("x", "y", "z", files=[f"{server}/files/garbage.parquet"])
    with pytest.raises(TaskError, match="404"):
        hf_rows("x", "y", "z", files=[f"{server}/files/missing.jsonl"])
    with pytest.raises(TaskError, match="row 0"):  # parses, but is not a GSM8K file
        get_task("gsm8k", files=[os.path.join(FIX, "mmlu.jsonl")])
    with pytest.raises(TaskError, match="no data"):
        hf_rows("nobody/nothing", "default", "train")

def test_gsm8k_annotations_become_tool_calls():
    parts = solution_parts(rows_of("gsm8k")[0]["answer"])
    assert parts[:4] == [{"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
                         {"type": "python_output", "text": "24"},
                         {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "}]
    assert parts[-1]["text"].endswith("#### 72") and sum(p["type"] == "python" for p in parts) == 2
    assert extract_answer("so #### 2,400") == "2400" and extract_answer("no marker 42") is None

def test_rewards_right_wrong_malformed(server):
    gsm = get_task("gsm8k", split="test")
    conv = next(c for c in gsm if c["messages"][0]["content"].startswith("A shop sells"))  # answer "#### 2,400"
    assert gsm.reward(conv, "It sells 2400 pens.\n#### 2400") == 1.0
    assert gsm.reward(conv, "#### 2,400") == 1.0
    assert gsm.reward(conv, "#### 2401") == 0.0
    assert gsm.reward(conv, "2400") == 0.0 and gsm.reward(conv, "") == 0.0 and gsm.reward(conv, "#### ") == 0.0
    mm = get_task("mmlu", split="test")
    two = by_question(mm, "What is 2 + 3?")
    assert mm.evaluate(two, "B") == 1 and mm.evaluate(two, " B\n") == 1
    assert mm.evaluate(two, "A") == 0 and mm.evaluate(two, "B) five") == 0 and mm.evaluate(two, "") == 0

def test_humaneval_runs_tests_in_sandbox(server):
    pytest.importorskip("model.sandbox")
    he = get_task("humaneval")
    conv = next(c for c in he if c["entry_point"] == "add")
    assert he.evaluate(conv, "```python\ndef add(a, b):\n    return a + b\n```") == 1
    assert he.evaluate(conv, "    return a + b\n") == 1  # body only: the prompt is prepended
    assert he.evaluate(conv, "def add(a, b):\n    return a - b\n") == 0
    assert he.evaluate(conv, "def add(a, b) return") == 0  # syntax error
    assert extract_program("text\n```python\nx = 1\n```\nmore") == "x = 1\n"

def test_embedded_tasks_deterministic_and_scored():
    a1, a2 = get_task("arithmetic"), get_task("arithmetic")
    assert a1[7] == a2[7] and a1[7] != get_task("arithmetic", split="test")[7]
    for i in range(20):
        conv = a1[i]
        parts = conv["messages"][1]["content"]
        py = [p["text"] for p in parts if p["type"] == "python"][0]
        out = [p["text"] for p in parts if p["type"] == "python_output"][0]
        assert str(eval(py)) == out  # the tool call really produces the answer
        assert a1.reward(conv, f"#### {out}") == 1.0 and a1.reward(conv, f"#### {int(out) + 1}") == 0.0
        assert a1.reward(conv, "I don't know") == 0.0
    sp = get_task("spelling")
    kinds = {sp[i].get("kind") for i in range(30)}
    assert kinds == {"spell", "count"}
    for i in range(30):
        conv = sp[i]
        if conv["kind"] == "spell":
            word = conv["messages"][1]["content"]
            assert sp.evaluate(conv, word) == 1 and sp.evaluate(conv, word + "-x") == 0
        else:
            n = conv["messages"][1]["content"][-1]["text"].split("#### ")[1]
            assert sp.evaluate(conv, f"#### {n}") == 1 and sp.evaluate(conv, "####") == 0
    idt = get_task("identity")
    assert idt.evaluate(idt[0], "I am tritonchat.") == 1 and idt.evaluate(idt[0], "I am GPT") == 0
    mc = get_task("number_mc")
    assert mc.eval_type == "categorical" and get_task("arithmetic").eval_type == "generative"
    conv = mc[0]
    nums = [int(c) for c in conv["choices"]]
    assert conv["messages"][1]["content"] == "ABCD"[nums.index(max(nums))]

def test_mixture_weights_and_errors():
    assert parse_spec("arithmetic:2, spelling,identity:0.5@7") == [("arithmetic", 2.0, None), ("spelling", 1.0, None),
                                                                   ("identity", 0.5, 7)]
    assert len(build_mixture("identity:2@7,spelling@3")) == 17
    mix = build_mixture("arithmetic:2,spelling,identity:0.5", n=10)
    assert len(mix) == 20 + 10 + 5
    counts = {}
    for t, _ in mix.index_map:
        counts[t] = counts.get(t, 0) + 1
    assert counts == {0: 20, 1: 10, 2: 5}
    assert mix.index_map[:10] != sorted(mix.index_map[:10])  # shuffled
    again = build_mixture("arithmetic:2,spelling,identity:0.5", n=10)
    assert [mix[i] for i in range(5)] == [again[i] for i in range(5)]
    with pytest.raises(TaskError, match=r"\[sft\] unknown task 'nope'"):
        build_mixture("arithmetic,nope", stage="sft")
    with pytest.raises(TaskError, match="bad task spec"):
        build_mixture("arithmetic:x")
    with pytest.raises(TaskError):
        TaskMixture([get_task("identity", n=3)], weights=[-1])
    with pytest.raises(IndexError):
        get_task("identity", n=3)[3]

GOOD = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]
BAD = [  # (messages, what the renderer says about them)
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     r"message 1 \(after merging a system message\) has role 'user', expected 'assistant'"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"}],
     "has role 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "a system message may only come first"),
    ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
    ([{"role": "user", "content": 7}], "message 0: content must be a str or a list of parts, got int"),
    ([{"role": "user", "content": [{"type": "python", "text": "1"}]}], "only assistant messages hold python parts"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "python"}]}],
     r"message 1 part 0: a part is \{\"type\": ..., \"text\": str\}"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "tool", "text": "x"}]}],
     "unknown part type 'tool'"),
    ([{"role": "tool", "content": "a"}], "unknown role 'tool'"),
    ([], "needs at least one message"),
]

@pytest.mark.parametrize("messages,reason", BAD)
def test_load_time_validation_of_what_rendering_requires(tmp_path, monkeypatch, messages, reason):
    """A conversation the tokenizer cannot render fails when the task loads (TaskError naming the task and the row),
    not mid-training; the renderer's own message says why."""
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (GOOD, GOOD, messages)))
    with pytest.raises(TaskError, match=r"^smoltalk: row 2: (.* )?" + reason):  # the file's row number
        get_task("smoltalk", files=[str(path)])
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (GOOD, GOOD)))
    assert len(get_task("smoltalk", files=[str(path)])) == 2

def test_every_built_in_task_renders(server):
    """What get_task returns renders: the embedded tasks and the fixture-backed real ones pass validation."""
    from model.tokenizer import conversation_messages
    for name in ("arithmetic", "spelling", "identity", "number_mc"):
        task = get_task(name, n=50)
        assert all(conversation_messages(task[i]) for i in range(len(task)))
    for name, split in (("smoltalk", "train"), ("mmlu", "test"), ("arc_easy", "test"), ("gsm8k", "test"),
                        ("humaneval", "test")):
        assert len(get_task(name, split=split)) > 0
