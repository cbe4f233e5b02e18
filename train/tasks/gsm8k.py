"""GSM8K (openai/gsm8k, Cobbe et al. 2021, https://arxiv.org/abs/2110.14168): grade-school math word problems with a
verifiable answer after "####", rows in common.py's seeded order. The text after each calculator annotation restates
its result (all 4282 of the test split), so the result shows once either way: as text the annotation is dropped
("She sold 48/2 = <<48/2=24>>24 clips" -> "She sold 48/2 = 24 clips"); as a tool call (chat) it is text
"She sold 48/2 = ", python "48/2", python_output "24", text "24 clips"."""
import re

from train.tasks.common import AnswerTask, extract_answer, real_rows

def strip_annotations(answer):
    """A GSM8K solution string as plain text: every `<<expr=result>>` removed."""
    return re.sub(r"<<[^>]*>>", "", answer)

def solution_parts(answer):
    """A GSM8K-style solution string -> assistant message parts with python tool calls."""
    parts = []
    for piece in re.split(r"(<<[^>]*>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts

def solution_text(content):
    """An assistant message as plain text: a string through strip_annotations, parts as their text parts only (the
    text after a tool call restates its result, in GSM8K and the embedded tasks)."""
    if isinstance(content, str):
        return strip_annotations(content)
    return "".join(p["text"] for p in content if p.get("type") == "text")

class GSM8K(AnswerTask):
    name = "gsm8k"

    def __init__(self, subset="main", split="test", files=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("main", "socratic") and split in ("train", "test"), \
            "GSM8K: subset main|socratic, split train|test"
        self.rows = real_rows("gsm8k", "openai/gsm8k", subset, split, files, lambda r: (
            isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
            and extract_answer(r["answer"]) is not None), "a question and an answer ending in '#### <number>'")

    def get_example(self, index):
        r = self.rows[index]
        return {"messages": [{"role": "user", "content": r["question"]},
                             {"role": "assistant", "content": solution_parts(r["answer"])}]}
