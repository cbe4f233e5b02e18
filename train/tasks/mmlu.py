"""MMLU (cais/mmlu): 57-subject 4-way multiple choice. subset "all" (test/validation/dev) for evaluation,
"auxiliary_train" (≈100 k questions, rows nested under "train") for midtraining. The files are sorted by subject
(or by source), so the rows are taken in the seeded order of train/tasks/order.py: any prefix mixes subjects."""
from train.tasks.common import MCTask, TaskError, hf_rows, mc_conversation
from train.tasks.order import seeded_order


class MMLU(MCTask):
    name = "mmlu"

    def __init__(self, subset="all", split="test", files=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("all", "auxiliary_train"), "MMLU subset must be all|auxiliary_train"
        rows = hf_rows("cais/mmlu", subset, split, files)
        if subset == "auxiliary_train":
            rows = [r.get("train", r) for r in rows]
        for i, r in enumerate(rows):  # row numbers of the file, before the seeded order
            if not (isinstance(r.get("question"), str) and isinstance(r.get("choices"), list)
                    and isinstance(r.get("answer"), int) and 0 <= r["answer"] < len(r["choices"])):
                raise TaskError(f"mmlu: row {i} needs question (str), choices (list) and answer (index)")
        self.rows = seeded_order(rows)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        r = self.rows[index]
        conv = mc_conversation(r["question"], r["choices"], r["answer"])
        conv["subject"] = r.get("subject", "")
        return conv
