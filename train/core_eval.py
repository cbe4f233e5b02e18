"""CORE: the in-context-learning score of a base model, as DCLM defines it (Li et al. 2024,
https://arxiv.org/abs/2406.11794: mean centred accuracy over 22 tasks of the MosaicML/DCLM eval bundle) and nanochat
computes it (https://github.com/karpathy/nanochat/blob/master/nanochat/core_eval.py and scripts/base_eval.py).
multiple_choice and schema: one prompt per option, the lowest mean loss over the tokens after the shared prefix
(choices) or of the shared suffix (schema) wins, the first on a tie; language_modeling: right when every continuation
token is the greedy prediction. Few-shot examples come first, each with its gold answer and "\n\n"; BOS is prepended.
Sampling as nanochat: items shuffled with Random(1337), the first `max_per_task` kept; item i's few-shot examples are
Random(1234 + i).sample of the other kept items. centred = (accuracy - b) / (1 - b), b the random baseline.
`load_bundle`: the eval bundle nanochat downloads, scored as "CORE"; `load_raw`: raw HF rows of ten of its datasets
with the bundle's templates (11 tasks), scored as "CORE-<datasets>". Long prompts lose their oldest tokens. Rank r
scores items r, r + world, ...; all ranks run the same number of forwards, so FSDP2 models work too.
"""
import csv
import json
import os
import random
import re
import time
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from model.common import UserError, all_reduce_sum, dist_info, local, print0, rank_share
from train.tasks.common import find_file, read_rows

MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING = "multiple_choice", "schema", "language_modeling"
SHUFFLE_SEED = 1337   # nanochat's scripts/base_eval.py: the order items are kept in when subsampling
FEWSHOT_SEED = 1234   # nanochat's core_eval.py: Random(FEWSHOT_SEED + item index) draws the few-shot examples

@dataclass
class Task:
    """One in-context task: items in the bundle's format for `kind`, in evaluation order; baseline: chance accuracy
    as a fraction (0.25, not 25); dataset: the file it came from; source: "bundle" or "raw"."""
    name: str
    kind: str
    items: list
    num_fewshot: int = 0
    delimiter: str = " "
    baseline: float = 0.0
    dataset: str = ""
    source: str = "bundle"

def render_mc(item, delimiter, fewshot=()):
    """Multiple choice -> one prompt per choice (list of str)."""
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]

def render_schema(item, delimiter, fewshot=()):
    """Schema -> one prompt per context option (list of str), all ending in the same continuation."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]

def render_lm(item, delimiter, fewshot=()):
    """Language modelling -> [prompt without the continuation, prompt with it]. Contexts are stripped, and so is the
    first prompt: a trailing space would merge into the continuation's first token."""
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    prompt = f"{shots}{item['context'].strip()}{delimiter}"
    return [prompt.strip(), prompt + item["continuation"]]

RENDER = {MULTIPLE_CHOICE: render_mc, SCHEMA: render_schema, LANGUAGE_MODELING: render_lm}

def subsample(items, max_per_task=None, seed=SHUFFLE_SEED):
    """A shuffled copy of `items` (random.Random(seed).shuffle, as nanochat always does), cut to max_per_task."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if max_per_task is None or max_per_task < 0 else items[:max_per_task]

def fewshot_indices(index, n, k):
    """Indices of the k few-shot examples of item `index` among n items: Random(1234 + index).sample of the other
    n - 1 indices (sampling range(n - 1) and skipping `index` draws the same numbers)."""
    picks = random.Random(FEWSHOT_SEED + index).sample(range(n - 1), k)
    return [j + (j >= index) for j in picks]

def scored_spans(kind, rows):
    """Token rows of one item's prompts -> (rows, starts, ends), tokens start..end-1 of each row scored (LM: the full
    prompt only). ValueError when the context's tokens are not a prefix of the full prompt's, as nanochat asserts."""
    ends = [len(r) for r in rows]
    if kind == MULTIPLE_CHOICE:
        return rows, [len(os.path.commonprefix(rows))] * len(rows), ends
    if kind == SCHEMA:
        suffix = len(os.path.commonprefix([r[::-1] for r in rows]))
        return rows, [n - suffix for n in ends], ends
    without, full = rows
    if not (len(without) < len(full) and full[:len(without)] == without):
        raise ValueError("language_modeling: the tokens of the prompt without the continuation are not a prefix of "
                         "the tokens of the prompt with it")
    return [full], [len(without)], [len(full)]

def crop(rows, starts, ends, max_len):
    """Keep the last max_len tokens of longer rows (dropping BOS and the oldest context), shifting their spans.
    ValueError when the scored span itself does not fit."""
    cuts = [max(0, len(row) - max_len) for row in rows]
    for s, e, cut in zip(starts, ends, cuts):
        if s - cut < 1:
            raise ValueError(f"a scored continuation of {e - s} tokens does not fit in {max_len} tokens of context")
    return ([r[c:] for r, c in zip(rows, cuts)], [s - c for s, c in zip(starts, cuts)],
            [e - c for e, c in zip(ends, cuts)])

@torch.no_grad()
def score_rows(model, rows, starts, ends, pad_id, device):
    """One right-padded forward -> per row (losses, predictions, targets), CPU tensors over positions p in start-1 ..
    end-2: the fp32 cross-entropy (nats) of token p + 1 and its argmax, gathered first (no (B, T, V) loss)."""
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    b = torch.cat([torch.full((e - s,), i, dtype=torch.long) for i, (s, e) in enumerate(zip(starts, ends))])
    p = torch.cat([torch.arange(s - 1, e - 1) for s, e in zip(starts, ends)])
    targets = x[b, p + 1]
    x, b, p = x.to(device), b.to(device), p.to(device)
    logits = model(x)[b, p].float()  # (scored positions, V)
    loss = F.cross_entropy(logits, targets.to(device), reduction="none").cpu()
    pred = logits.argmax(dim=-1).cpu()
    sizes = [e - s for s, e in zip(starts, ends)]
    return list(zip(loss.split(sizes), pred.split(sizes), targets.split(sizes)))

def _prepared(task, items, indices, tokenizer, max_len):
    """Yield (index, gold, rows, starts, ends) of the items at `indices`, tokenizing a few hundred at a time."""
    for lo in range(0, len(indices), 256):
        chunk = indices[lo:lo + 256]
        prompts = [RENDER[task.kind](items[i], task.delimiter,
                                     [items[j] for j in fewshot_indices(i, len(items), task.num_fewshot)])
                   for i in chunk]
        flat = tokenizer.encode([p for ps in prompts for p in ps], prepend=tokenizer.bos_token_id)
        at = 0
        for i, ps in zip(chunk, prompts):
            rows, at = flat[at:at + len(ps)], at + len(ps)
            try:
                spans = scored_spans(task.kind, rows)
                if max_len is not None:
                    spans = crop(*spans, max_len)
            except ValueError as e:
                raise UserError(f"CORE task {task.name}, item {i}: {e}") from None
            yield (i, items[i].get("gold"), *spans)

def _batches(prepared, batch_size, max_batch_tokens):
    """Group prepared items: at most batch_size items and max_batch_tokens padded tokens (rows x longest row) per
    batch; an item too big for the budget goes alone."""
    batch, n_rows, width = [], 0, 0
    for entry in prepared:
        rows = entry[2]
        w = max(width, max(len(r) for r in rows))
        if batch and (len(batch) >= batch_size or (n_rows + len(rows)) * w > max_batch_tokens):
            yield batch
            batch, n_rows, w = [], 0, max(len(r) for r in rows)
        batch.append(entry)
        n_rows, width = n_rows + len(rows), w
    if batch:
        yield batch

@torch.no_grad()
def evaluate_task(model, tokenizer, task, *, max_per_task=None, batch_size=8, max_batch_tokens=16384, max_seq_len=None):
    """Accuracy of `model` on one task -> dict(accuracy, centered, n, correct, baseline, num_fewshot, kind, seconds).
    Collective under torch.distributed (every rank calls it with the same task)."""
    items = task.items if max_per_task is None or max_per_task < 0 else task.items[:max_per_task]
    n = len(items)
    if n == 0:
        raise UserError(f"CORE task {task.name}: no items")
    if task.num_fewshot >= n:
        raise UserError(f"CORE task {task.name}: {task.num_fewshot}-shot needs at least {task.num_fewshot + 1} "
                        f"items, got {n} (raise max_per_task)")
    info = dist_info()
    p = next(model.parameters(), None)
    device = local(p).device if p is not None else torch.device("cpu")
    t0 = time.time()
    # crop length: the argument, else the model's max_seq_len (nanochat's GPT has none), else its rotary table's
    max_len = next((int(v) for v in (max_seq_len, getattr(model, "max_seq_len", None),
                                     getattr(model, "rotary_len", None)) if v), None)
    indices = rank_share(n)
    batches = _batches(_prepared(task, items, indices, tokenizer, max_len), batch_size, max_batch_tokens)
    pad = tokenizer.bos_token_id
    correct = count = 0
    while True:
        batch = next(batches, None)
        if info.world_size > 1 and dist.is_initialized():
            more = torch.tensor([int(batch is not None)], dtype=torch.int32, device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():  # no rank has a batch left
                break
            if batch is None:  # keep FSDP's per-forward collectives in step with the ranks that still score
                model(torch.full((1, 1), pad, dtype=torch.long, device=device))
                continue
        elif batch is None:
            break
        rows_starts_ends = [[x for entry in batch for x in entry[k]] for k in (2, 3, 4)]
        scored = iter(score_rows(model, *rows_starts_ends, pad, device))
        for _, gold, rows, _, _ in batch:
            losses, pred, target = zip(*[next(scored) for _ in rows])
            if task.kind == LANGUAGE_MODELING:
                correct += bool(torch.equal(pred[0], target[0]))
            else:  # Python floats and list.index(min(...)): nanochat's tie rule (first minimum)
                means = [loss.mean().item() for loss in losses]
                correct += means.index(min(means)) == gold
        count += len(batch)
    correct, count = all_reduce_sum([correct, count])
    accuracy = correct / count
    return dict(accuracy=accuracy, centered=centred(accuracy, task.baseline), n=int(count), correct=int(correct),
                baseline=task.baseline, num_fewshot=task.num_fewshot, kind=task.kind, seconds=time.time() - t0)

def centred(accuracy, baseline):
    """(accuracy - baseline) / (1 - baseline): 0 at chance, 1 when every item is right."""
    return (accuracy - baseline) / (1.0 - baseline)

def core_name(tasks):
    """"CORE" for bundle tasks; "CORE-<number of distinct datasets>" as soon as a raw-dataset task is in."""
    return "CORE" if all(t.source == "bundle" for t in tasks) else f"CORE-{len({t.dataset for t in tasks})}"

def evaluate_core(model, tokenizer, tasks, *, max_per_task=None, log=print0, **kwargs):
    """Score `model` (token ids (B, T) -> logits (B, T, V)) on every task, logging a line per task -> {"name": "CORE"
    | "CORE-<n>", "score": mean centred accuracy, "tasks": {name: evaluate_task's dict}, "max_per_task"}.
    max_per_task: the first items of each (shuffled) task; kwargs: evaluate_task's batch_size / max_batch_tokens (one
    forward's items and padded tokens), max_seq_len (crop from the left; default: model.max_seq_len or rotary_len)."""
    if not tasks:
        raise UserError("CORE: no tasks to evaluate")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"CORE: task names repeat: {names}")
    name = core_name(tasks)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            r = results[task.name] = evaluate_task(model, tokenizer, task, max_per_task=max_per_task, **kwargs)
            if log:
                log(f"{name} {task.name:<34} {r['num_fewshot']:>2}-shot {task.kind:<17} | accuracy "
                    f"{r['accuracy']:.4f} | centred {r['centered']:+.4f} | {r['n']} items | "
                    f"{r['n'] / max(r['seconds'], 1e-9):.1f} items/s | {r['seconds']:.1f}s")
    finally:
        model.train(was_training)
    score = sum(r["centered"] for r in results.values()) / len(results)
    if log:
        log(f"{name}: {score:.4f} (mean centred accuracy over {len(results)} tasks)")
    return {"name": name, "score": score, "tasks": results, "max_per_task": max_per_task}

def format_results(result):
    """A results dict -> a text table (task, accuracy, centred, items) ending with the score's line."""
    lines = [f"{'Task':<35} {'Accuracy':>9} {'Centred':>9} {'Items':>6}"]
    lines += [f"{t:<35} {r['accuracy']:>9.4f} {r['centered']:>9.4f} {r['n']:>6}" for t, r in result["tasks"].items()]
    lines.append(f"{result['name']:<35} {'':>9} {result['score']:>9.4f}")
    return "\n".join(lines)

def _read_icl_tasks(path):
    with open(path, encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise UserError(f"{path}: no icl_tasks list")
    return config["icl_tasks"]

def _read_baselines(path):
    """eval_meta_data.csv -> {task label: random baseline as a fraction}: 0.01 * percent, as nanochat (bit for bit)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (the eval bundle's random baselines)")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"Eval Task", "Random baseline"} <= set(reader.fieldnames or ()):
            raise UserError(f"{path}: needs the columns 'Eval Task' and 'Random baseline'")
        return {row["Eval Task"]: 0.01 * float(row["Random baseline"]) for row in reader}

REQUIRED = {MULTIPLE_CHOICE: ("query", "choices", "gold"), SCHEMA: ("context_options", "continuation", "gold"),
            LANGUAGE_MODELING: ("context", "continuation")}

def check_item(kind, item):
    """None if `item` is a valid item of `kind`, else a short reason."""
    if not isinstance(item, dict):
        return "not a JSON object"
    if missing := [k for k in REQUIRED[kind] if k not in item]:
        return f"missing {', '.join(missing)}"
    options = item.get("choices", item.get("context_options"))
    if kind != LANGUAGE_MODELING:
        if not isinstance(options, list) or len(options) < 2:
            return "needs at least two options"
        if not isinstance(item["gold"], int) or not 0 <= item["gold"] < len(options):
            return f"gold {item['gold']!r} is not an index into {len(options)} options"

def _read_items(path, kind, label):
    if not os.path.isfile(path):
        raise UserError(f"CORE task {label}: data file {path} is missing")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not JSON ({e})") from None
            if problem := check_item(kind, item):
                raise UserError(f"{path}:{lineno}: not a {kind} item: {problem}")
            items.append(item)
    return items

def load_bundle(directory, max_per_task=None, seed=SHUFFLE_SEED):
    """An eval bundle folder -> list[Task] in core.yaml's order, from core.yaml (icl_tasks: label, icl_task_type,
    dataset_uri, num_fewshot, continuation_delimiter), eval_meta_data.csv (Eval Task, Random baseline in percent) and
    eval_data/<dataset_uri> (jsonl); items subsample'd. UserError on a missing or malformed file."""
    config = os.path.join(directory, "core.yaml")
    if not os.path.isfile(config):
        raise UserError(f"{directory}: no core.yaml (an eval bundle holds core.yaml, eval_meta_data.csv, eval_data/)")
    baselines = _read_baselines(os.path.join(directory, "eval_meta_data.csv"))
    tasks = []
    for entry in _read_icl_tasks(config):
        if missing := [k for k in ("label", "icl_task_type", "dataset_uri") if k not in entry]:
            raise UserError(f"{config}: a task lacks {', '.join(missing)}: {entry}")
        label, kind = entry["label"], entry["icl_task_type"]
        if label not in baselines:
            raise UserError(f"{config}: task {label} has no random baseline in eval_meta_data.csv")
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        if kind not in RENDER:
            raise UserError(f"{config}: task {label} has unsupported type {kind!r} (CORE uses {', '.join(RENDER)})")
        items = _read_items(os.path.join(directory, "eval_data", entry["dataset_uri"]), kind, label)
        tasks.append(Task(label, kind, subsample(items, max_per_task, seed), int(shots),
                          entry.get("continuation_delimiter", " "), baselines[label], entry["dataset_uri"], "bundle"))
    if not tasks:
        raise UserError(f"{config}: icl_tasks is empty")
    return tasks

# Raw HF rows -> bundle items with the bundle's templates (MosaicML llm-foundry's scripts/eval/local_data): on the
# splits both have, copa, piqa, winogrande, boolq and commonsense_qa render as the bundle's rows, in its order. The
# bundle's arc and openbook_qa are test splits (validation here); its LAMBADA keeps paragraph breaks the raw copy has
# as spaces; its ARC rows labelled "1".."4" have gold one too high (here: the answer's index among the row's labels).
def _hellaswag_clean(text):
    """lm-evaluation-harness's HellaSwag cleanup: " [title]" becomes ". ", other [tags] go, double spaces collapse."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")

def _mc(query, choices, gold):
    return {"query": query, "choices": list(choices), "gold": int(gold)}

def _labelled(row, query):
    """{choices {text, label}, answerKey} -> multiple choice; gold: the answer's index among the row's own labels."""
    return _mc(query, row["choices"]["text"], list(row["choices"]["label"]).index(row["answerKey"]))

def render_hellaswag(row):
    """Rowan/hellaswag {activity_label, ctx_a, ctx_b, endings, label (str)} -> multiple choice."""
    query = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return _mc(query, map(_hellaswag_clean, row["endings"]), row["label"])

def render_arc(row):
    """allenai/ai2_arc {question, choices {text, label}, answerKey} -> multiple choice ("Question: ...")."""
    return _labelled(row, f"Question: {row['question']}")

def render_openbookqa(row):
    """allenai/openbookqa {question_stem, choices, answerKey} -> multiple choice (the stem alone)."""
    return _labelled(row, row["question_stem"])

def render_copa(row):
    """super_glue copa {premise, choice1, choice2, question cause|effect, label} -> "<premise>, because|therefore"."""
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    return _mc(f"{row['premise'].strip()[:-1]}, {connector}",
               [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])], row["label"])

def render_piqa(row):
    """piqa {goal, sol1, sol2, label} -> multiple choice ("Question: <goal>\\n", stripped solutions)."""
    return _mc(f"Question: {row['goal']}\n", [row["sol1"].strip(), row["sol2"].strip()], row["label"])

def render_boolq(row):
    """super_glue boolq {passage, question, answer} -> multiple choice "Passage: ...\\nQuestion: ...?", ["no", "yes"];
    as in the bundle's file, every " question" (any case, passages too: 22 of 3270 rows) becomes "\\nQuestion"."""
    text = f"Passage: {row['passage']}\nQuestion: {row['question']}?"
    return _mc(re.sub(" question", "\nQuestion", text, flags=re.IGNORECASE), ["no", "yes"], bool(row["answer"]))

# The bundle's commonsense_qa shows four of the five options: which distractor it drops depends only on the answer's
# position (answer index -> dropped index), as read off all 1221 validation rows of its file.
CSQA_DROPPED = {0: 1, 1: 2, 2: 3, 3: 0, 4: 1}

def render_commonsense_qa(row):
    """tau/commonsense_qa {question, choices {label, text} (5), answerKey} -> four options "A. ..".."D. .." in the
    query, the letters as choices."""
    item = _labelled(row, "")
    texts, gold = item["choices"], item["gold"]
    if len(texts) != 5:
        raise ValueError(f"commonsense_qa rows have 5 options, this one has {len(texts)}")
    keep = [i for i in range(5) if i != CSQA_DROPPED[gold]]
    options = "".join(f"\n{letter}. {texts[i]}" for letter, i in zip("ABCD", keep))
    return _mc(f"Question: {row['question']}\nChoices:{options}\nAnswer:", "ABCD", keep.index(gold))

def render_winogrande(row):
    """winogrande {sentence with "_", option1, option2, answer "1"|"2"} -> schema: "<before _><option>", "<after _>"."""
    sentence, cut = row["sentence"], row["sentence"].index("_")
    return {"context_options": [sentence[:cut] + row["option1"], sentence[:cut] + row["option2"]],
            "continuation": sentence[cut + 1:].strip(), "gold": int(row["answer"]) - 1}

def render_lambada(row):
    """LAMBADA (OpenAI) {context, continuation (last word)} -> language modelling."""
    return {"context": row["context"], "continuation": row["continuation"]}

# A CORE task over a raw dataset file: label as in core.yaml, file stem (.parquet or .jsonl), HF id and split, row
# renderer, task type, few-shot count, delimiter, random baseline in percent (DCLM's table: 1/choices except boolq,
# 62 for its majority class, and commonsense_qa, 20 for five options though four are shown), rows of the full file.
RawTask = namedtuple("RawTask", "label stem hf render kind num_fewshot delimiter baseline rows")
RAW_TASKS = (
    RawTask("hellaswag_zeroshot", "hellaswag_validation", "Rowan/hellaswag validation", render_hellaswag,
            MULTIPLE_CHOICE, 0, " ", 25, 10042),
    RawTask("arc_easy", "arc_easy_validation", "allenai/ai2_arc ARC-Easy validation", render_arc, MULTIPLE_CHOICE,
            10, "\nAnswer: ", 25, 570),
    RawTask("arc_challenge", "arc_challenge_validation", "allenai/ai2_arc ARC-Challenge validation", render_arc,
            MULTIPLE_CHOICE, 10, "\nAnswer: ", 25, 299),
    RawTask("copa", "copa_validation", "super_glue copa validation", render_copa, MULTIPLE_CHOICE, 0, " ", 50, 100),
    RawTask("commonsense_qa", "commonsense_qa_validation", "tau/commonsense_qa validation", render_commonsense_qa,
            MULTIPLE_CHOICE, 10, " ", 20, 1221),
    RawTask("piqa", "piqa_validation", "piqa validation", render_piqa, MULTIPLE_CHOICE, 10, "\nAnswer: ", 50, 1838),
    RawTask("openbook_qa", "openbookqa_validation", "allenai/openbookqa main validation", render_openbookqa,
            MULTIPLE_CHOICE, 0, " ", 25, 500),
    RawTask("lambada_openai", "lambada_openai_test", "EleutherAI/lambada_openai test", render_lambada,
            LANGUAGE_MODELING, 0, " ", 0, 5153),
    RawTask("hellaswag", "hellaswag_validation", "Rowan/hellaswag validation", render_hellaswag, MULTIPLE_CHOICE,
            10, " ", 25, 10042),
    RawTask("winogrande", "winogrande_validation", "allenai/winogrande winogrande_xl validation", render_winogrande,
            SCHEMA, 0, " ", 50, 1267),
    RawTask("boolq", "boolq_validation", "super_glue boolq validation", render_boolq, MULTIPLE_CHOICE, 10,
            "\nAnswer: ", 62, 3270),
)

def load_raw(directory, max_per_task=None, seed=SHUFFLE_SEED, names=None):
    """list[Task] (source "raw") of every RAW_TASKS entry whose <stem>.parquet or .jsonl is in `directory` or its core/,
    items subsample'd; names: only these labels (UserError if one is missing)."""
    folder = directory
    if not any(find_file(directory, t.stem) for t in RAW_TASKS) and os.path.isdir(os.path.join(directory, "core")):
        folder = os.path.join(directory, "core")
    if unknown := set(names or ()) - {t.label for t in RAW_TASKS}:
        raise UserError(f"unknown raw CORE task(s) {sorted(unknown)}: choose from {[t.label for t in RAW_TASKS]}")
    tasks, cache = [], {}
    for spec in RAW_TASKS:
        if names is not None and spec.label not in names:
            continue
        if (path := find_file(folder, spec.stem)) is None:
            if names is not None:
                raise UserError(f"raw CORE task {spec.label}: no {spec.stem}.parquet or .jsonl in {folder}")
            continue
        if path not in cache:
            cache[path] = read_rows(path)
        items = []
        for i, row in enumerate(cache[path]):
            try:
                items.append(spec.render(row))
            except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
                raise UserError(f"{path}: row {i} does not fit the {spec.hf} schema "
                                f"({type(e).__name__}: {e})") from None
        tasks.append(Task(spec.label, spec.kind, subsample(items, max_per_task, seed), spec.num_fewshot,
                          spec.delimiter, 0.01 * spec.baseline, spec.stem, "raw"))
    if not tasks:
        raise UserError(f"no raw CORE dataset files in {directory} (expected e.g. "
                        f"{', '.join(t.stem + '.parquet' for t in RAW_TASKS[:3])}, ...)")
    return tasks

def load_tasks(directory, max_per_task=None, seed=SHUFFLE_SEED):
    """An eval bundle (a folder with core.yaml) through load_bundle, else raw dataset files through load_raw."""
    if os.path.isfile(os.path.join(directory, "core.yaml")):
        return load_bundle(directory, max_per_task, seed)
    return load_raw(directory, max_per_task, seed)
