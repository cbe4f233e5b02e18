"""MMLU (cais/mmlu): 57-subject 4-way multiple choice. subset "all" (test/validation/dev) for evaluation,
"auxiliary_train" (≈100 k questions, rows nested under "train") for midtraining. The files are sorted by subject
(or by source), so the rows are taken in the seeded order of train/tasks/common.py: any prefix mixes subjects."""
from train.tasks.common import MCTask, mc_conversation, real_rows

class MMLU(MCTask):
    name = "mmlu"

    def __init__(self, subset="all", split="test", files=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("all", "auxiliary_train"), "MMLU subset must be all|auxiliary_train"
        self.rows = real_rows("mmlu", "cais/mmlu", subset, split, files, lambda r: (
            isinstance(r.get("question"), str) and isinstance(r.get("choices"), list)
            and isinstance(r.get("answer"), int) and 0 <= r["answer"] < len(r["choices"])),
            "question (str), choices (list) and answer (index)",
            prepare=(lambda r: r.get("train", r)) if subset == "auxiliary_train" else None)

    def get_example(self, index):
        r = self.rows[index]
        return dict(mc_conversation(r["question"], r["choices"], r["answer"]), subject=r.get("subject", ""))
