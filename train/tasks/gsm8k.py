"""GSM8K (openai/gsm8k): grade-school math word problems with a verifiable answer after "####".

The reference solutions carry calculator annotations `<<48/2=24>>`; each becomes a python tool call (the
expression) followed by its output (the result), so the model learns to call the tool and the Engine can run it:
    "She sold 48/2 = <<48/2=24>>24 clips"
        -> text "She sold 48/2 = ", python "48/2", python_output "24", text "24 clips"
"""
import re

from train.tasks.common import AnswerTask, TaskError, extract_answer, hf_rows


def solution_parts(answer):
    """A GSM8K-style solution string -> assistant message parts with python tool calls."""
    parts = []
    for piece in re.split(r"(<<[^>]*>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(AnswerTask):
    name = "gsm8k"

    def __init__(self, subset="main", split="test", files=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("main", "socratic") and split in ("train", "test"), \
            "GSM8K: subset main|socratic, split train|test"
        self.rows = hf_rows("openai/gsm8k", subset, split, files)
        for i, r in enumerate(self.rows):
            if not (isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
                    and extract_answer(r["answer"]) is not None):
                raise TaskError(f"gsm8k: row {i} needs a question and an answer ending in '#### <number>'")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        r = self.rows[index]
        return {"messages": [{"role": "user", "content": r["question"]},
                             {"role": "assistant", "content": solution_parts(r["answer"])}]}
