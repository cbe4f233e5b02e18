"""Tasks: datasets of conversations with a score. `get_task(name, split)` builds one by name; `build_mixture(spec)` a
weighted mixture from a spec such as "arithmetic:2,spelling,identity:0.5,smoltalk@10000" (":w" = weight in epochs,
"@n" = the first n examples: of a real task, downloaded on first use and in a seeded shuffle (common.py), a seeded
sample). Embedded tasks generate each example from its own seed; train and test seeds differ (test problems unseen)."""
from train.tasks import arc, embedded, gsm8k, humaneval, mmlu, smoltalk
from train.tasks.common import TaskError, TaskMixture

EMBEDDED = {"arithmetic": embedded.Arithmetic, "spelling": embedded.Spelling, "identity": embedded.Identity,
            "number_mc": embedded.NumberMC}
# name -> (class, fixed keyword arguments); mmlu_aux has only a train split, humaneval only a test split
REAL_TASKS = {"smoltalk": (smoltalk.SmolTalk, {}), "mmlu": (mmlu.MMLU, {"subset": "all"}),
              "mmlu_aux": (mmlu.MMLU, {"subset": "auxiliary_train", "split": "train"}),
              "arc_easy": (arc.ARC, {"subset": "ARC-Easy"}), "arc_challenge": (arc.ARC, {"subset": "ARC-Challenge"}),
              "gsm8k": (gsm8k.GSM8K, {}), "humaneval": (humaneval.HumanEval, {"split": "test"})}
TASKS = (*EMBEDDED, *REAL_TASKS)

def get_task(name, split="train", n=None, files=None, **kwargs):
    """One task by name, each example checked (Task.validate: TaskError naming it). split: train | test (| validation
    for ARC); n: an embedded task's size, or a real one's first n (seeded) examples; files: paths/URLs, not the hub."""
    if name in EMBEDDED:
        task = EMBEDDED[name](n=n or (2000 if split == "train" else 200),
                              seed={"train": 0, "test": 1, "validation": 2}[split], **kwargs)
    elif name in REAL_TASKS:
        cls, fixed = REAL_TASKS[name]
        task = cls(**{"split": split, "files": files, "stop": n, **kwargs, **fixed})
    else:
        raise TaskError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return task.validate()

def parse_spec(spec):
    """"a:2,b@100" -> [("a", 2.0, None), ("b", 1.0, 100)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        head, _, n = item.partition("@")
        name, _, w = head.partition(":")
        try:
            out.append((name, float(w) if w else 1.0, int(n) if n else None))
        except ValueError:
            raise TaskError(f"bad task spec item {item!r} (want name, name:weight, name@count)") from None
    if not out:
        raise TaskError(f"empty task spec {spec!r}")
    return out

def build_mixture(spec, split="train", stage="?", n=None, seed=42):
    """A TaskMixture from a spec string; any task error is re-raised naming the stage."""
    try:
        items = parse_spec(spec)
        tasks = [get_task(name, split, n=k or n) for name, _, k in items]
        return TaskMixture(tasks, [w for _, w, _ in items], seed=seed)
    except TaskError as e:
        raise TaskError(f"[{stage}] {e}") from e
