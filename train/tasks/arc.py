"""ARC (allenai/ai2_arc): grade-school science multiple choice, subsets ARC-Easy and ARC-Challenge. Rows in the
seeded order of train/tasks/common.py."""
from train.tasks.common import MCTask, mc_conversation, real_rows

class ARC(MCTask):
    name = "arc"

    def __init__(self, subset="ARC-Easy", split="test", files=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge"), "ARC subset must be ARC-Easy|ARC-Challenge"
        assert split in ("train", "validation", "test"), "ARC split must be train|validation|test"
        self.name = subset.lower()
        self.rows = real_rows(self.name, "allenai/ai2_arc", subset, split, files, lambda r: (
            isinstance(r.get("question"), str) and isinstance(r.get("choices"), dict)
            and r.get("answerKey") in r["choices"].get("label", [])),
            "question, choices {text, label} and an answerKey among the labels")

    def get_example(self, index):
        r = self.rows[index]  # labels are sometimes "1".."4"; presented as A, B, C, ... (the answer index carries over)
        return mc_conversation(r["question"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
