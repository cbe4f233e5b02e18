"""What every task shares: the Task base class, the mixture, the two scored formats (multiple choice: MCTask; a
number after "####": AnswerTask), and the dataset downloader. A Task is indexable (`task[i]` -> conversation in
model/tokenizer.py's format), has an `eval_type` ("categorical" for multiple choice, else "generative") and scores
with `task.evaluate(conversation, completion_text) -> 0|1` (RL: `task.reward(...) -> float`). Real datasets come from
Hugging Face's parquet export, {base}/{repo}/resolve/refs%2Fconvert%2Fparquet/{config}/{split}/{i:04d}.parquet with
base = $TRITONCHAT_DATA_URL (default https://huggingface.co/datasets), shards 0, 1, ... until a 404, cached under
$TRITONCHAT_HOME/data/tasks/<repo>/<config>/<split>/; or from `files=[...]`: local paths or URLs (.parquet, .jsonl).
"""
import hashlib
import json
import os
import random
import re

import numpy as np
import pyarrow.parquet as pq

from model.common import DownloadError, UserError, download, home_dir
from model.tokenizer import conversation_messages

MAX_PARQUET_SHARDS = 10_000

class TaskError(UserError):
    """Bad task input (unknown task, a file that does not parse, a failed download, a reward that raised): entry
    points print its one line (naming the stage and the file) and exit with status 2."""

def check_conversation(conversation):
    """The conversation, unchanged, if model/tokenizer.py can render it, else TaskError with the reason."""
    try:
        conversation_messages(conversation)
    except ValueError as e:
        raise TaskError(str(e)) from None
    return conversation

class Task:
    """A dataset of conversations (real tasks: over `self.rows`), cut to its first `stop` examples if given."""
    eval_type = "generative"
    name = "task"

    def __init__(self, stop=None):
        assert stop is None or stop >= 0, stop
        self.stop = stop

    def num_examples(self):
        return len(self.rows)

    def __len__(self):
        return self.num_examples() if self.stop is None else min(self.stop, self.num_examples())

    def __getitem__(self, index):  # the IndexError past the end also ends iteration
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} examples")
        return self.get_example(index)

    def validate(self):
        """Check every example once, at load time (check_conversation) -> self; TaskError naming the task and the
        example, so a bad row stops the run before training. Tasks that checked their rows as read set validated."""
        if getattr(self, "validated", False):
            return self
        for i in range(len(self)):
            try:
                check_conversation(self[i])
            except TaskError as e:
                raise TaskError(f"{self.name}: example {i}: {e}") from None
            except Exception as e:  # noqa: BLE001 - a row the task's own code cannot turn into a conversation
                raise TaskError(f"{self.name}: example {i}: {type(e).__name__}: {e}") from None
        self.validated = True
        return self

    def evaluate(self, conversation, completion):
        raise NotImplementedError(f"{self.name} has no evaluation")

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))

class TaskMixture(Task):
    """Several tasks mixed by a deterministic shuffle. `weights` (or `epochs`) repeat a task: a weight of 2 puts
    every example in twice, 0.5 half of them (the first half of a seeded permutation)."""
    name = "mixture"

    def __init__(self, tasks, weights=None, seed=42, **kwargs):
        super().__init__(**kwargs)
        weights = [1.0] * len(tasks) if weights is None else list(weights)
        if len(weights) != len(tasks) or any(w < 0 for w in weights):
            raise TaskError(f"mixture: need one non-negative weight per task, got {weights} for {len(tasks)} tasks")
        self.tasks, self.weights = tasks, weights
        rng = random.Random(seed)
        self.index_map = []
        for t, (task, w) in enumerate(zip(tasks, weights)):
            perm = list(range(len(task)))
            rng.shuffle(perm)
            idx = list(range(len(task))) * int(w) + perm[:int(round((w - int(w)) * len(task)))]
            self.index_map += [(t, i) for i in idx]
        rng.shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]

    def validate(self):
        """Every task validated on its own (errors name the task, not the mixture) -> self."""
        for task in self.tasks:
            task.validate()
        return self

    def describe(self):  # the name messages show (train/data.py)
        return "mixture of " + ", ".join(task.name for task in self.tasks)

def mc_conversation(question, choices, answer_idx, letters="ABCDEFGHIJ"):
    """nanochat's multiple-choice conversation: the letter comes *after* each choice with no space before it (small
    models bind better), and the answer is that bare letter."""
    letters = tuple(letters[:len(choices)])
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": letters[answer_idx]}],
            "letters": letters, "question": question, "choices": list(choices), "answer": answer_idx}

class MCTask(Task):
    """Multiple choice: conversations carry "letters"; a completion is right when it is exactly the answer letter."""
    eval_type = "categorical"

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"])

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")

def extract_answer(text):
    """The number after '####' with commas removed (the official normalisation), or None."""
    m = ANSWER_RE.search(text)
    return m.group(1).strip().replace(",", "").rstrip(".") if m else None

class AnswerTask(Task):
    """Generative task scored by exact match of the '####' answer (GSM8K and the embedded arithmetic)."""

    def evaluate(self, conversation, completion):
        content = conversation["messages"][-1]["content"]  # str or parts
        ref = extract_answer(content if isinstance(content, str) else "".join(p["text"] for p in content))
        pred = extract_answer(completion)
        return int(pred is not None and pred == ref)

def cache_dir(*parts):
    path = os.path.join(home_dir(), "data", "tasks", *parts)
    os.makedirs(path, exist_ok=True)
    return path

def cached_download(url, path):
    """url -> path unless already there (model.common.download) -> path, None on a 404, else TaskError."""
    if os.path.exists(path):
        return path
    try:
        return download(url, path, retries=4, backoff=0.5)
    except DownloadError as e:
        if e.status == 404:
            return None
        raise TaskError(str(e)) from None

def find_file(folder, stem):
    """<folder>/<stem>.parquet, else <folder>/<stem>.jsonl, else None."""
    for ext in (".parquet", ".jsonl"):
        if os.path.isfile(path := os.path.join(folder, stem + ext)):
            return path
    return None

def read_rows(path):
    """Rows (list of dicts) of a .parquet or .jsonl file; TaskError naming the file when it does not parse."""
    try:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - any parse failure becomes one clear message
        raise TaskError(f"cannot parse task file {path}: {type(e).__name__}: {e}") from e

def hf_rows(repo, config, split, files=None):
    """All rows of one split: from `files` (paths or URLs) if given, else from the HF parquet export shards."""
    if files:
        rows = []
        for f in files:
            if "://" in f:
                name = f"{hashlib.sha1(f.encode()).hexdigest()[:12]}_{os.path.basename(f)}"
                local = os.path.join(cache_dir("urls"), name)
                if cached_download(f, local) is None:
                    raise TaskError(f"not found (404): {f}")
                f = local
            if not os.path.exists(f):
                raise TaskError(f"task file not found: {f}")
            rows += read_rows(f)
        return rows
    folder = cache_dir(repo.replace("/", "__"), config, split)
    done = os.path.join(folder, "COMPLETE")  # written once the 404 after the last shard was seen
    if os.path.exists(done):
        n = int(open(done).read())
        return [row for i in range(n) for row in read_rows(os.path.join(folder, f"{i:04d}.parquet"))]
    rows, base = [], os.environ.get("TRITONCHAT_DATA_URL", "https://huggingface.co/datasets").rstrip("/")
    for i in range(MAX_PARQUET_SHARDS):
        url = f"{base}/{repo}/resolve/refs%2Fconvert%2Fparquet/{config}/{split}/{i:04d}.parquet"
        path = cached_download(url, os.path.join(folder, f"{i:04d}.parquet"))
        if path is None:
            if i == 0:
                raise TaskError(f"no data for {repo} {config}/{split}: 404 at {url}")
            with open(done, "w") as f:
                f.write(str(i))
            return rows
        rows += read_rows(path)
    # the export numbers shards with 4 digits; a server that never 404s would loop
    raise TaskError(f"{repo} {config}/{split}: {base} served {MAX_PARQUET_SHARDS} shards without the 404 that "
                    f"ends the list; check $TRITONCHAT_DATA_URL / --data-url")

# Real rows are presented in numpy.random.default_rng(42).permutation(n) order: what HF's Dataset.shuffle(seed=42)
# applies, as nanochat's tasks load every split (https://github.com/karpathy/nanochat/blob/master/tasks/mmlu.py), so
# any prefix of a task (--max-examples 100, mmlu@500, the first RL prompts) is a seeded sample, the same everywhere.
def permutation(n, seed=42):
    """list of the n indices 0..n-1 in the seeded order."""
    return np.random.default_rng(seed).permutation(n).tolist()

def seeded_order(rows, seed=42):
    """The rows (a list) in the seeded order: rows[permutation(len(rows))[i]] at position i."""
    return [rows[i] for i in permutation(len(rows), seed)]

def real_rows(name, repo, config, split, files, ok, needs, prepare=None):
    """hf_rows, each (prepared) row checked with ok(row) (TaskError "<name>: row i needs <needs>"), in seeded order."""
    rows = hf_rows(repo, config, split, files)
    rows = rows if prepare is None else [prepare(r) for r in rows]
    for i, r in enumerate(rows):
        if not ok(r):
            raise TaskError(f"{name}: row {i} needs {needs}")
    return seeded_order(rows)
