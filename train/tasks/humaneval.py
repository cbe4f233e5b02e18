"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, scored by running the unit tests in the
sandbox (model/sandbox.py: subprocess, timeout, memory limit)."""
import re

from model.sandbox import run_python
from train.tasks.common import Task, TaskError, hf_rows


def extract_program(completion):
    """The code in a completion: the first ```python fenced block if there is one, else the whole text."""
    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, re.DOTALL)
    return m.group(1) if m else completion


class HumanEval(Task):
    name = "humaneval"
    eval_type = "generative"

    def __init__(self, split="test", files=None, timeout=5.0, memory_mb=256, **kwargs):
        super().__init__(**kwargs)
        self.timeout, self.memory_mb = timeout, memory_mb
        self.rows = hf_rows("openai/openai_humaneval", "openai_humaneval", split, files)
        for i, r in enumerate(self.rows):
            if not all(isinstance(r.get(k), str) for k in ("prompt", "canonical_solution", "test", "entry_point")):
                raise TaskError(f"humaneval: row {i} needs prompt, canonical_solution, test and entry_point strings")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        r = self.rows[index]
        return {"messages": [{"role": "user", "content": r["prompt"]},
                             {"role": "assistant", "content": r["prompt"] + r["canonical_solution"]}],
                "entry_point": r["entry_point"], "test": r["test"], "prompt": r["prompt"]}

    def evaluate(self, conversation, completion):
        code = extract_program(completion)
        if f"def {conversation['entry_point']}" not in code:  # the model continued the body only
            code = conversation["prompt"] + code
        program = f"{code}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"
        result = run_python(program, timeout=self.timeout, memory_mb=self.memory_mb)
        return int(bool(result.success))
