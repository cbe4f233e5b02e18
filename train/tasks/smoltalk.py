"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations, the bulk of midtraining and part of SFT. Rows
in the seeded order of train/tasks/common.py, so `smoltalk@10000` is a seeded sample of the split."""
from train.tasks.common import Task, TaskError, check_conversation, hf_rows, seeded_order

class SmolTalk(Task):
    name = "smoltalk"

    def __init__(self, split="train", files=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), "SmolTalk split must be train|test"
        rows = hf_rows("HuggingFaceTB/smol-smoltalk", "default", split, files)
        for i, row in enumerate(rows):  # what rendering requires, once, so a bad file fails here and not mid-training
            try:
                check_conversation({"messages": row.get("messages") if isinstance(row, dict) else row})
            except TaskError as e:
                raise TaskError(f"smoltalk: row {i}: {e}") from None
        self.rows = seeded_order(rows)
        self.validated = True  # every row of the file (the file's row numbers in errors, not the seeded order's)

    def get_example(self, index):
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]}
