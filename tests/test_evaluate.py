"""Evaluation scoring on a hand-built bigram "model" and a character tokenizer, so every number is predictable:
bits per byte, CORE-style multiple choice / LM scoring, categorical chat scoring, generative scoring, ChatCORE.
Then the real benchmarks: which CORE runs on which folder, chat-eval files, seeded subsets, GSM8K's annotations
rendered with the result once, HumanEval programs that keep the prompt's context (all 164 canonical solutions, when
the shared real-data folder is present)."""
import json
import math
import os
import re
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import UserError
from model.sandbox import jail_status, run_python
from train import evaluate as ev
from train.tasks import get_task
from train.tasks.common import permutation
from train.tasks.gsm8k import solution_parts, solution_text, strip_annotations
from train.tasks.humaneval import build_program
from train.tasks.realdata import SAMPLE_DIR, sample_rows
from stand_ins import ByteTokenizer

torch.manual_seed(0)

class CharTok(ByteTokenizer):
    """Byte-level tokenizer with a minimal chat template."""

    def render_for_completion(self, conv):
        user = conv["messages"][0]["content"]
        return [256, 257] + self.encode(user) + [258, 259]

class Bigram(nn.Module):
    """logits[t] = table[idx[t]]: the next token depends only on the current one."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.table[idx]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

def test_centred_and_chatcore():
    assert ev.centred(0.25, 0.25) == 0 and ev.centred(1.0, 0.25) == 1 and ev.centred(0.5, 0.0) == 0.5
    assert ev.chatcore({"a": 0.625, "b": 0.1}, {"a": 0.25, "b": 0.0}) == pytest.approx((0.5 + 0.1) / 2)

def test_bits_per_byte_hand_computed():
    tok = CharTok()
    tb = ev.token_bytes(tok)
    assert tb[65] == 1 and tb[256] == 0  # 'A' is one byte; special tokens count zero
    assert tb[200] == 3  # as nanochat: bytes of the decoded text (a lone byte >= 128 decodes to U+FFFD)
    V = tok.vocab_size
    model = Bigram(torch.zeros(V, V))  # uniform: loss = ln V per token
    x = torch.tensor([[256, 65, 66, 67]])
    y = torch.tensor([[65, 66, 67, 256]])  # the special target counts 0 bytes and is skipped
    bpb = ev.evaluate_bpb(model, [(x, y)], torch.ones(V, dtype=torch.long).index_fill_(0, torch.arange(256, V), 0))
    assert bpb == pytest.approx(3 * math.log(V) / (math.log(2) * 3))
    y2 = torch.tensor([[65, 66, -1, -1]])
    bpb2 = ev.evaluate_bpb(model, [(x, y2)], torch.ones(V, dtype=torch.long) * 2)
    assert bpb2 == pytest.approx(2 * math.log(V) / (math.log(2) * 4))

def test_continuation_losses_and_exact_match():
    V = CharTok.vocab_size
    table = torch.zeros(V, V)
    table[ord("a"), ord("b")] = 5.0  # after 'a' the model strongly predicts 'b'
    table[ord("b"), ord("c")] = 5.0
    model = Bigram(table)
    a, b, c, d = (ord(ch) for ch in "abcd")
    losses, exact = ev.continuation_losses(model, [[a], [a], [a, b]], [[b, c], [d], [c]])
    assert exact == [True, False, True]
    lp_good = -F.log_softmax(table[a], -1)[b].item()
    assert losses[0] == pytest.approx((lp_good + -F.log_softmax(table[b], -1)[c].item()) / 2, rel=1e-5)
    assert losses[1] == pytest.approx(-F.log_softmax(table[a], -1)[d].item(), rel=1e-5)

def test_core_mc_picks_lowest_loss_choice():
    tok = CharTok()
    task = get_task("number_mc", split="test", n=12)
    V = tok.vocab_size
    # a model that loves the digit '9' after a space: picks any choice starting with 9, else essentially random
    table = torch.zeros(V, V)
    table[ord(" "), ord("9")] = 8.0
    acc = ev.core_task_score(Bigram(table), tok, task, "mc", num_shots=1, max_examples=12)
    # every example whose largest number starts with 9 and is the only 9x choice is solved
    solved_by_nine = sum(1 for i in range(12) if [c.startswith("9") for c in task[i]["choices"]].count(True) == 1
                         and task[i]["choices"][task[i]["answer"]].startswith("9"))
    assert acc >= solved_by_nine / 12

def test_categorical_accuracy_uses_letter_logits():
    tok = CharTok()
    task = get_task("number_mc", split="test", n=20)
    V = tok.vocab_size
    table = torch.zeros(V, V)
    table[259, ord("B")] = 3.0  # after <|assistant_start|> always prefers "B"
    table[259, ord("Z")] = 9.0  # not a choice letter: must be ignored
    acc = ev.categorical_accuracy(Bigram(table), tok, task, batch_size=3)
    expect = sum(task[i]["messages"][1]["content"] == "B" for i in range(20)) / 20
    assert acc == pytest.approx(expect)

class FakeEngine:
    def __init__(self, tok, answer_fn):
        self.tok, self.answer_fn, self.calls = tok, answer_fn, 0

    def generate_batch(self, prompt, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        self.calls += 1
        text = self.answer_fn(self.tok.decode(prompt))
        seqs = [prompt + self.tok.encode(text) + [260]] * num_samples
        return seqs, [[0] * len(prompt) + [1] * (len(text) + 1)] * num_samples

    def generate_many(self, prompts, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        return [self.generate_batch(p, num_samples, max_tokens, temperature, top_k, seed + i)
                for i, p in enumerate(prompts)]

def test_generative_accuracy_and_bad_reward():
    tok = CharTok()
    task = get_task("arithmetic", split="test", n=10)
    answers = {task[i]["messages"][0]["content"]: task[i]["messages"][1]["content"][-1]["text"] for i in range(10)}
    right = FakeEngine(tok, lambda p: next(a for q, a in answers.items() if q in p))
    assert ev.generative_accuracy(right, tok, task) == 1.0
    wrong = FakeEngine(tok, lambda p: "#### -1")
    assert ev.generative_accuracy(wrong, tok, task) == 0.0

    class Boom:
        name, eval_type = "boom", "generative"

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return task[0]

        def evaluate(self, conv, text):
            raise KeyError("no answer")

    from train.tasks import TaskError
    with pytest.raises(TaskError, match=r"\[sft\] scoring function of task boom raised"):
        ev.generative_accuracy(wrong, tok, Boom(), stage="sft")

# ------------------------------------------------------------------------------------------------ real benchmarks
# The shared real-data folder (../shared/realdata, see its README) when present; the embedded sample always.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.environ.get("TRITONCHAT_REALDATA") or os.path.join(ROOT, "..", "shared", "realdata")
REAL_CHAT = os.path.join(REAL, "chat")
needs_real = pytest.mark.skipif(not os.path.isdir(REAL_CHAT),
                                reason=f"the shared real-data files are not at {REAL} (set TRITONCHAT_REALDATA)")
needs_jail = pytest.mark.skipif(jail_status().mode != "bwrap", reason="HumanEval runs only in the sandbox's jail")
# documented row counts of the shared folder's chat files (its README)
CHAT_ROWS = {"arc_easy": 2376, "arc_challenge": 1172, "mmlu": 14042, "gsm8k": 1319, "humaneval": 164}

def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

def test_chat_files_found_in_the_sample_and_the_shared_folder(tmp_path):
    found = ev.chat_files(SAMPLE_DIR)  # the sample keeps them in chat/
    assert {k: os.path.basename(v) for k, v in found.items()} == {
        "arc_easy": "ARC-Easy_test_reconstructed.jsonl", "arc_challenge": "ARC-Challenge_test_reconstructed.jsonl",
        "mmlu": "mmlu_all_test.jsonl", "gsm8k": "gsm8k_main_test.jsonl", "humaneval": "humaneval_test.jsonl"}
    (tmp_path / "ARC-Easy_test.parquet").write_bytes(b"")  # HF's export name, preferred over the rebuilt one
    (tmp_path / "ARC-Easy_test_reconstructed.parquet").write_bytes(b"")
    assert ev.chat_files(str(tmp_path)) == {"arc_easy": str(tmp_path / "ARC-Easy_test.parquet")}
    with pytest.raises(UserError, match="not a folder"):
        ev.chat_files(str(tmp_path / "nope"))

@needs_real
def test_real_chat_tasks_load_with_the_documented_row_counts():
    files = ev.chat_files(REAL_CHAT)
    assert set(files) == set(CHAT_ROWS)
    for name, rows in CHAT_ROWS.items():
        assert len(get_task(name, split="test", files=[files[name]])) == rows, name

# ---- subsets: a seeded shuffle of the whole set
def test_subsets_are_seeded_shuffles_of_the_whole_set(tmp_path):
    """A file sorted by subject (as MMLU's is): the first 100 examples of the task mix both subjects, are the rows
    at numpy's default_rng(42).permutation (Hugging Face's shuffle(seed=42), as nanochat), and are the same on every
    load; `n=` (a mixture's `name@n`) takes the same prefix, and splitting it over ranks covers it exactly."""
    rows = [{"question": f"q{i}", "subject": "algebra" if i < 100 else "botany", "choices": ["a", "b", "c", "d"],
             "answer": i % 4} for i in range(200)]
    path = tmp_path / "mmlu_all_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("mmlu", split="test", files=[str(path)])
    first = [task[i]["question"] for i in range(100)]
    assert first == [f"q{i}" for i in permutation(200)[:100]]
    assert {task[i]["subject"] for i in range(100)} == {"algebra", "botany"}
    assert 30 < sum(task[i]["subject"] == "algebra" for i in range(100)) < 70
    again = get_task("mmlu", split="test", files=[str(path)], n=100)
    assert len(again) == 100 and [again[i]["question"] for i in range(100)] == first
    assert sorted(q for r in range(3) for q in (task[i]["question"] for i in range(r, 100, 3))) == sorted(first)
    # every real task presents its rows in that order (validated first, so errors name the file's rows)
    gsm = [{"question": f"g{i}", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(50)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    g = get_task("gsm8k", split="test", files=[str(tmp_path / "g.jsonl")])
    assert [g[i]["messages"][0]["content"] for i in range(5)] == [f"g{i}" for i in permutation(50)[:5]]

@needs_real
def test_mmlu_hundred_examples_span_many_subjects():
    """The real test file is sorted by subject (abstract_algebra has exactly its first 100 rows)."""
    path = ev.chat_files(REAL_CHAT)["mmlu"]
    task = get_task("mmlu", split="test", files=[path])
    subjects = {task[i]["subject"] for i in range(100)}
    assert len(subjects) >= 30, subjects

def test_categorical_eval_scores_the_seeded_subset(tmp_path):
    """categorical_accuracy with max_examples scores the task's first examples, i.e. the seeded sample: a model that
    always answers "A" scores exactly the share of "A" answers among them."""
    rows = [{"question": f"q{i}", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 0 if i < 60 else 1}
            for i in range(120)]  # sorted: a first-N subset would score 1.0
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("mmlu", split="test", files=[str(path)])
    V = CharTok.vocab_size
    table = torch.zeros(V, V)
    table[259, ord("A")] = 5.0
    acc = ev.categorical_accuracy(Bigram(table), CharTok(), task, max_examples=40)
    expect = sum(rows[i]["answer"] == 0 for i in permutation(120)[:40]) / 40
    assert acc == pytest.approx(expect) and 0.2 < acc < 0.8

# ---- GSM8K: calculator annotations rendered as the authors meant
ELIZA = sample_rows("chat/gsm8k_main_test")[0]  # a real test row (source row 9)
ELIZA_TEXT = ("Eliza is entitled to 45 -40 = 5 hours overtime pay.\n"
              "Her hourly rate for the overtime pay is $10 x 1.2 = $12.\n"
              "So, Eliza will receive $12 x 5 =$60 for overtime pay.\n"
              "Her regular weekly earning is $10 x 40 = $400.\n"
              "Thus, Eliza will receive a total of $400 + $60 = $460 for this week's work.\n#### 460")

def test_gsm8k_annotations_render_with_the_result_once():
    assert ELIZA["question"].startswith("Eliza's rate per hour")
    assert strip_annotations(ELIZA["answer"]) == ELIZA_TEXT
    parts = solution_parts(ELIZA["answer"])
    assert solution_text(parts) == ELIZA_TEXT  # the tool-call form, read as text, is the same solution
    assert parts[:4] == [{"type": "text", "text": "Eliza is entitled to 45 -40 = "},
                         {"type": "python", "text": "45-40"}, {"type": "python_output", "text": "5"},
                         {"type": "text", "text": "5 hours overtime pay.\nHer hourly rate for the overtime pay is "
                                                  "$10 x 1.2 = $"}]
    # the embedded arithmetic task follows the same convention: its text restates the tool's result
    conv = get_task("arithmetic", split="test")[0]
    parts = conv["messages"][1]["content"]
    result = [p["text"] for p in parts if p["type"] == "python_output"][0]
    assert solution_text(parts) == parts[0]["text"] + f"{result}.\n#### {result}"

@needs_real
def test_gsm8k_janet_row_and_all_answers_parse():
    rows = read_jsonl(os.path.join(REAL_CHAT, "gsm8k_main_test.jsonl"))
    assert len(rows) == 1319
    assert strip_annotations(rows[0]["answer"]) == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer’s market.\n#### 18")
    task = get_task("gsm8k", split="test", files=[os.path.join(REAL_CHAT, "gsm8k_main_test.jsonl")])
    for i in range(len(task)):
        conv = task[i]
        ref = ev.extract_answer(solution_text(conv["messages"][1]["content"]))
        assert re.fullmatch(r"-?\d+", ref), (i, ref)  # every answer parses, to an integer
        assert task.reward(conv, f"so the answer is\n#### {ref}") == 1.0
    answers = {ev.extract_answer(r["answer"]) for r in rows}
    assert None not in answers

def test_base_prompt_renders_gsm8k_solutions_as_text(tmp_path, monkeypatch):
    """The CORE-style language-modelling prompt of a GSM8K item: few-shot solutions and the item's own solution
    show each result once (no "45-40" glued to "5"), the continuation is the answer."""
    rows = [ELIZA, {"question": "How many?", "answer": "Two and two is 2+2 = <<2+2=4>>4.\n#### 4"}]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("gsm8k", split="test", files=[str(path)])
    seen = []

    def fake_losses(model, contexts, continuations):
        seen.extend((tok.decode(c), tok.decode(k)) for c, k in zip(contexts, continuations))
        return [0.0] * len(contexts), [False] * len(contexts)
    tok = CharTok()
    monkeypatch.setattr(ev, "continuation_losses", fake_losses)
    ev.core_task_score(None, tok, task, "lm", num_shots=1, max_examples=2)
    eliza = f"Question: {ELIZA['question']}\nAnswer: {ELIZA_TEXT}"
    two = "Question: How many?\nAnswer: Two and two is 2+2 = 4.\n#### 4"
    assert sorted(seen) == sorted([(f"{eliza}\n\n{two[:-1]}", "4"), (f"{two}\n\n{eliza[:-3]}", "460")])

# ---- HumanEval: the prompt's context is always available to the answer
def _full_function(conv):
    """The canonical answer written as a whole function, without the prompt's imports or helpers."""
    text = conv["prompt"] + conv["messages"][1]["content"][len(conv["prompt"]):]
    return text[re.search(rf"^def {conv['entry_point']}\(", text, re.MULTILINE).start():]

def _body(conv):
    return conv["messages"][1]["content"][len(conv["prompt"]):]

WRONG_BODY = "    return None\n"

@needs_jail
def test_humaneval_answers_with_imports_and_helpers_of_the_prompt():
    """Problems whose prompt imports from typing (0) or defines helpers the answer calls (38, 50): the canonical
    answer passes as a body, as a whole function (also fenced, or indented) and a wrong one fails. HumanEval/10 and
    /32 (helpers, math) are in test_all_164_canonical_solutions_pass, which needs the shared files."""
    task = get_task("humaneval", files=[os.path.join(SAMPLE_DIR, "chat", "humaneval_test.jsonl")])
    convs = {task[i]["task_id"]: task[i] for i in range(len(task))}
    pairs, expect = [], []
    for tid in ("HumanEval/0", "HumanEval/38", "HumanEval/50"):
        conv = convs[tid]
        full = _full_function(conv)
        assert "import" not in full and full.count("def ") == 1
        for answer, ok in ((_body(conv), 1), (full, 1), (f"Here it is:\n```python\n{full}```\nDone.", 1),
                           (re.sub("^", "    ", full, flags=re.MULTILINE), 1), (WRONG_BODY, 0),
                           (full.replace("return", "return None and", 1), 0), (full[:-10], 0)):
            pairs.append((conv, answer))
            expect.append(ok)
    assert task.evaluate_many(pairs, workers=4) == expect

BATCH_RUNNER = r'''
import json
results = []
for source in json.loads(PROGRAMS):
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__main__"})
        results.append(1)
    except BaseException:
        results.append(0)
print(json.dumps(results))
'''

def run_batched(programs, per_call=110):
    """Run many programs in a few jailed processes (each program in its own namespace) -> list of 0|1."""
    out = []
    for s in range(0, len(programs), per_call):
        chunk = programs[s:s + per_call]
        r = run_python(f"PROGRAMS = {json.dumps(json.dumps(chunk))}\n{BATCH_RUNNER}", timeout=120, memory_mb=1024)
        assert r.success, r.error
        out += json.loads(r.stdout)
    return out

@needs_real
@needs_jail
def test_all_164_canonical_solutions_pass():
    """All 164 real problems, the canonical solution given as a body and as a whole function without the prompt's
    imports or helpers, and a wrong body: the programs build_program makes (what HumanEval.evaluate runs, one jail
    each) run here in three jailed processes, 328 right and 164 wrong. HumanEval/10, /32, /38, /50 and the typing
    problems also go through evaluate itself."""
    task = get_task("humaneval", files=[os.path.join(REAL_CHAT, "humaneval_test.jsonl")])
    convs = [task[i] for i in range(len(task))]
    assert len(convs) == 164
    programs = [task.program(c, answer) for c in convs for answer in (_body(c), _full_function(c), WRONG_BODY)]
    t0 = time.time()
    results = run_batched(programs)
    by_id = {c["task_id"]: results[3 * i:3 * i + 3] for i, c in enumerate(convs)}
    assert {tid: r for tid, r in by_id.items() if r != [1, 1, 0]} == {}, f"({time.time() - t0:.0f} s)"
    chosen = [c for c in convs if c["task_id"] in ("HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50",
                                                   "HumanEval/1", "HumanEval/12")]
    assert all("from typing" in c["prompt"] for c in chosen if c["task_id"] in ("HumanEval/1", "HumanEval/12"))
    pairs = [(c, a) for c in chosen for a in (_body(c), _full_function(c), WRONG_BODY)]
    assert task.evaluate_many(pairs, workers=4) == [1, 1, 0] * len(chosen)

def test_build_program_keeps_the_prompt_first():
    prompt = "import math\n\n\ndef helper(x):\n    return 2 * x\n\n\ndef f(x):\n    \"\"\"Twice x.\"\"\"\n"
    test = "def check(c):\n    assert c(2) == 4\n"
    assert build_program(prompt, "    return helper(x)\n", test, "f") == (
        prompt + "    return helper(x)\n\n\n" + test + "\n\ncheck(f)\n")
    assert build_program(prompt, "  def f(x):\n      return helper(x)\n", test, "f") == (
        prompt + "\ndef f(x):\n    return helper(x)\n\n\n" + test + "\n\ncheck(f)\n")
    # "def f_other(" is not the entry point: a body
    assert build_program(prompt, "    def f_other(y):\n        return y\n", test, "f").startswith(
        prompt + "    def f_other")

def test_real_chat_rows_render_as_written():
    """One real row of ARC and of MMLU (the embedded sample) as the chat model sees it: nanochat's multiple-choice
    prompt, the answer a bare letter."""
    arc = get_task("arc_easy", split="test", files=[ev.chat_files(SAMPLE_DIR)["arc_easy"]])
    conv = next(c for c in arc if c["question"].startswith("Marshall learned"))
    assert conv["messages"] == [
        {"role": "user", "content": "Multiple Choice question: Marshall learned that plants need a substance from "
                                    "the air to make their own food. What does a plant take from the air in the "
                                    "presence of sunlight?\n- carbon dioxide=A\n- hydrogen=B\n- nitrogen=C\n"
                                    "- oxygen=D\n\nRespond only with the letter of the correct answer."},
        {"role": "assistant", "content": "A"}]
    mmlu = get_task("mmlu", split="test", files=[ev.chat_files(SAMPLE_DIR)["mmlu"]])
    conv = next(c for c in mmlu if c["question"].startswith("Statement 1| Every group of order p^2"))
    assert conv["subject"] == "abstract_algebra" and conv["messages"][1]["content"] == "A"
    assert conv["messages"][0]["content"].endswith(
        "Sylow p-subgroup of G.\n- True, True=A\n- False, False=B\n- True, False=C\n- False, True=D\n\n"
        "Respond only with the letter of the correct answer.")
