"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations, the bulk of midtraining and part of SFT. Rows
in the seeded order of train/tasks/order.py, so `smoltalk@10000` is a seeded sample of the split."""
from train.tasks.common import Task, TaskError, hf_rows
from train.tasks.order import seeded_order


class SmolTalk(Task):
    name = "smoltalk"

    def __init__(self, split="train", files=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), "SmolTalk split must be train|test"
        rows = hf_rows("HuggingFaceTB/smol-smoltalk", "default", split, files)
        for i, row in enumerate(rows):  # validate once, so a bad file fails here and not mid-training
            msgs = row.get("messages")
            if not msgs or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                   and isinstance(m.get("content"), str) for m in msgs):
                raise TaskError(f"smoltalk: row {i} has no valid 'messages' list of role/content dicts")
        self.rows = seeded_order(rows)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]}
