"""MMLU (cais/mmlu): 57-subject 4-way multiple choice. subset "all" (test/validation/dev) for evaluation,
"auxiliary_train" (≈100 k questions, rows nested under "train") for midtraining."""
from train.tasks.common import MCTask, TaskError, hf_rows, mc_conversation


class MMLU(MCTask):
    name = "mmlu"

    def __init__(self, subset="all", split="test", files=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("all", "auxiliary_train"), "MMLU subset must be all|auxiliary_train"
        self.rows = hf_rows("cais/mmlu", subset, split, files)
        if subset == "auxiliary_train":
            self.rows = [r.get("train", r) for r in self.rows]
        for i, r in enumerate(self.rows):
            if not (isinstance(r.get("question"), str) and isinstance(r.get("choices"), list)
                    and isinstance(r.get("answer"), int) and 0 <= r["answer"] < len(r["choices"])):
                raise TaskError(f"mmlu: row {i} needs question (str), choices (list) and answer (index)")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        r = self.rows[index]
        conv = mc_conversation(r["question"], r["choices"], r["answer"])
        conv["subject"] = r.get("subject", "")
        return conv
