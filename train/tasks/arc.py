"""ARC (allenai/ai2_arc): grade-school science multiple choice, subsets ARC-Easy and ARC-Challenge. Rows in the
seeded order of train/tasks/order.py."""
from train.tasks.common import MCTask, TaskError, hf_rows, mc_conversation
from train.tasks.order import seeded_order


class ARC(MCTask):
    name = "arc"

    def __init__(self, subset="ARC-Easy", split="test", files=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge"), "ARC subset must be ARC-Easy|ARC-Challenge"
        assert split in ("train", "validation", "test"), "ARC split must be train|validation|test"
        self.name = subset.lower()
        rows = hf_rows("allenai/ai2_arc", subset, split, files)
        for i, r in enumerate(rows):  # row numbers of the file, before the seeded order
            ch = r.get("choices")
            if not (isinstance(r.get("question"), str) and isinstance(ch, dict)
                    and r.get("answerKey") in ch.get("label", [])):
                raise TaskError(f"{self.name}: row {i} needs question, choices {{text, label}} and an answerKey "
                                "among the labels")
        self.rows = seeded_order(rows)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        r = self.rows[index]
        labels = r["choices"]["label"]
        # labels are sometimes "1".."4"; we always present A, B, C, ... (the answer index carries over)
        return mc_conversation(r["question"], r["choices"]["text"], labels.index(r["answerKey"]))
