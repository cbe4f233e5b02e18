"""HumanEval (openai/openai_humaneval, Chen et al. 2021, https://arxiv.org/abs/2107.03374): 164 Python functions to
complete, rows in common.py's seeded order, scored by running the unit tests in the sandbox (model/sandbox.py): the
prompt (imports, helpers, signature, docstring: HumanEval/10, /32, /38, /50 call helpers of their prompt, 21 prompts
import from typing), the answer (a body continuing it, or a whole `def <entry_point>(` dedented after it), then the
problem's `check` function and `check(<entry_point>)`, right when the program exits cleanly."""
import os
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor

from model.sandbox import run_python
from train.tasks.common import Task, real_rows

def extract_program(completion):
    """The code in a completion: the first ```python fenced block if there is one, else the whole text."""
    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, re.DOTALL)
    return m.group(1) if m else completion

def build_program(prompt, code, test, entry_point):
    """The program that scores `code` (a body or a whole function) against one problem -> str."""
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    if re.search(rf"^[ \t]*(async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", code, re.MULTILINE):
        code = "\n" + textwrap.dedent(code)  # a whole function goes to the top level after the prompt
    return f"{head}{code}\n\n{test}\n\ncheck({entry_point})\n"

class HumanEval(Task):
    name = "humaneval"

    def __init__(self, split="test", files=None, timeout=5.0, memory_mb=256, **kwargs):
        super().__init__(**kwargs)
        self.timeout, self.memory_mb = timeout, memory_mb
        self.rows = real_rows("humaneval", "openai/openai_humaneval", "openai_humaneval", split, files, lambda r: all(
            isinstance(r.get(k), str) for k in ("prompt", "canonical_solution", "test", "entry_point")),
            "prompt, canonical_solution, test and entry_point strings")

    def get_example(self, index):
        r = self.rows[index]
        return {"messages": [{"role": "user", "content": r["prompt"]},
                             {"role": "assistant", "content": r["prompt"] + r["canonical_solution"]}],
                "entry_point": r["entry_point"], "test": r["test"], "prompt": r["prompt"],
                "task_id": r.get("task_id", "")}

    def program(self, conversation, completion):
        """The program run for one completion (see build_program)."""
        return build_program(conversation["prompt"], extract_program(completion), conversation["test"],
                             conversation["entry_point"])

    def evaluate(self, conversation, completion):
        result = run_python(self.program(conversation, completion), timeout=self.timeout, memory_mb=self.memory_mb)
        return int(bool(result.success))

    def evaluate_many(self, pairs, workers=None):
        """[(conversation, completion), ...] -> [0|1, ...] in order, `workers` jails at once (default: CPUs, >= 2)."""
        pairs = list(pairs)
        with ThreadPoolExecutor(min(workers or max(2, os.cpu_count() or 1), max(1, len(pairs)))) as pool:
            return list(pool.map(lambda ct: self.evaluate(*ct), pairs))
