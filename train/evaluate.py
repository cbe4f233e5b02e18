"""Evaluation: base models (val bits-per-byte, CORE, CORE-style scoring) and chat models (ChatCORE).

    python -m train.evaluate --mode base                                # the base model: val bpb, CORE-style, CORE
    python -m train.evaluate --mode base --data-dir ../shared/realdata/core --max-per-task 200   # CORE-10, raw files
    python -m train.evaluate --mode chat --source sft                   # embedded tasks + cached real ones
    python -m train.evaluate --mode chat --data-dir ../shared/realdata/chat     # ARC, MMLU, GSM8K, HumanEval, offline
    torchrun --nproc_per_node=8 -m train.evaluate -- --mode chat --source rl --tasks gsm8k,humaneval

Base: val bpb = next-token nats / (ln 2 * bytes of the target tokens), special tokens counting zero bytes; CORE
(train/core_eval.py) on the first source found: an eval bundle ("CORE") or raw dataset files ("CORE-10") in
--data-dir, the bundle at $TRITONCHAT_HOME/eval_bundle or nanochat's, else the embedded sample; CORE-style scoring
of the embedded (and cached real) tasks on few-shot "Question: ...\nAnswer: <x>" prompts. Chat: categorical tasks
(ARC, MMLU, number_mc) take the argmax over the choice letters at <|assistant_start|>; generative ones are sampled
with the Engine, tools live (HumanEval runs in the sandbox). Scores are centred, (acc - chance) / (1 - chance), and
averaged (ChatCORE: chance 0.25 for multiple choice, 0 for generative). `--max-examples N` scores the first N
examples, a seeded sample, the same on every run and rank; ranks split the examples (i % world == rank).
"""
import argparse
import itertools
import json
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from model.checkpoint import load_model
from model.common import (ArgumentParser, UserError, all_reduce_sum, dist_info, home_dir, local, print0, rank_share,
                          run_main)
from model.engine import Engine
from model.tokenizer import SPECIAL_TOKENS
from train.data import TokenLoader, load_corpus
from train.distributed import cleanup, init_distributed
from train import core_eval
from train.core_eval import centred
from train.tasks import TaskError, get_task
from train.tasks.common import cache_dir, extract_answer, find_file
from train.tasks.gsm8k import solution_text
from train.tasks.realdata import SAMPLE_DIR

def chatcore(results, chances):
    """Mean centred accuracy; results and chances are dicts keyed by task name."""
    return sum(centred(results[k], chances[k]) for k in results) / max(1, len(results))

def _my_indices(task, max_examples):
    """This rank's share of the first max_examples (None: all) examples of task: i % world == rank."""
    return rank_share(len(task) if max_examples is None else min(len(task), max_examples))

def token_bytes(tokenizer):
    """int64 tensor (vocab,): UTF-8 byte length of every token, 0 for special tokens (not counted in bpb)."""
    if hasattr(tokenizer, "token_bytes"):  # model.tokenizer.Tokenizer knows the exact bytes of partial characters
        return torch.tensor(tokenizer.token_bytes(), dtype=torch.long)
    special = {tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    nbytes = [0 if i in special else len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size)]
    return torch.tensor(nbytes, dtype=torch.long)

@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes):
    """Bits per byte over an iterable of (x, y): sum of nats / (ln 2 · bytes of the target tokens), special (0-byte)
    and -1 targets left out, summed over all ranks (collective). Every stage and the report card log this number."""
    was_training = model.training
    model.eval()
    stats, it = None, iter(batches)
    device = next(model.parameters()).device  # NCCL collectives need CUDA tensors
    tbytes = token_bytes.to(device)
    world = dist_info().world_size
    while True:
        batch = next(it, None)
        if world > 1:  # ranks may hold different amounts of data: stop together (FSDP forward is collective)
            more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MIN)
            if not more.item():
                break
        if batch is None:
            break
        x, y = batch
        loss = model(x, y, loss_reduction="none").reshape(-1).float()  # (B*T,) nats
        yf = y.reshape(-1)
        tb = tbytes[yf.clamp(min=0)] * (yf >= 0)
        step = torch.stack([(loss * (tb > 0)).sum(), tb.sum().to(loss.dtype)])  # nats, bytes
        stats = step if stats is None else stats + step
    if stats is None:
        raise UserError("evaluate_bpb: no validation batches (the validation set is smaller than one batch)")
    stats = stats.double()
    if world > 1:
        dist.all_reduce(stats)
    model.train(was_training)
    return (stats[0] / (math.log(2) * stats[1])).item()

@torch.no_grad()
def continuation_losses(model, contexts, continuations):
    """One right-padded batch -> (mean loss of each continuation after its context, whether the greedy prediction
    matches it exactly), two lists."""
    rows = [c + k for c, k in zip(contexts, continuations)]
    T = max(len(r) for r in rows)
    dev = local(next(model.parameters())).device
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (c, k, r) in enumerate(zip(contexts, continuations, rows)):
        x[i, :len(r) - 1] = torch.tensor(r[:-1])
        y[i, len(c) - 1:len(r) - 1] = torch.tensor(k)
    x, y = x.to(dev), y.to(dev)
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1,
                           reduction="none").view(y.shape)
    valid = y >= 0
    mean = (loss * valid).sum(1) / valid.sum(1).clamp(min=1)
    exact = ((logits.argmax(-1) == y) | ~valid).all(1)
    return mean.tolist(), exact.tolist()

def core_task_score(model, tokenizer, task, kind, num_shots=3, max_examples=100, seed=1234):
    """CORE-style accuracy of a base model on a task. kind "mc" uses the conversations' question/choices/answer;
    kind "lm" uses user question -> assistant text, the continuation being the number after '####'."""
    bos = tokenizer.bos_token_id

    def qa(c):  # "lm": question, solution up to "#### ", answer
        text = solution_text(c["messages"][-1]["content"])
        return c["messages"][0]["content"], text[:text.rindex("#### ") + 5], extract_answer(text)
    correct, idx = 0, _my_indices(task, max_examples)
    for i in idx:
        rng = random.Random(seed + i)
        shots = [task[j] for j in rng.sample([j for j in range(len(task)) if j != i], min(num_shots, len(task) - 1))]
        conv = task[i]
        if kind == "mc":
            prefix = "".join(f"Question: {s['question']}\nAnswer: {s['choices'][s['answer']]}\n\n" for s in shots)
            ctx = [bos] + tokenizer.encode(prefix + f"Question: {conv['question']}\nAnswer:")
            conts = [tokenizer.encode(" " + c) for c in conv["choices"]]
            losses, _ = continuation_losses(model, [ctx] * len(conts), conts)
            correct += int(min(range(len(conts)), key=losses.__getitem__) == conv["answer"])
        else:
            prefix = "".join(f"Question: {q}\nAnswer: {s}{a}\n\n" for q, s, a in map(qa, shots))
            q, sol, ans = qa(conv)
            ctx = [bos] + tokenizer.encode(prefix + f"Question: {q}\nAnswer: {sol}")
            _, exact = continuation_losses(model, [ctx], [tokenizer.encode(ans)])
            correct += int(exact[0])
    correct, total = all_reduce_sum([correct, len(idx)])
    return correct / max(total, 1)

@torch.no_grad()
def categorical_accuracy(model, tokenizer, task, max_examples=None, batch_size=8):
    """Multiple choice: argmax of the logits after <|assistant_start|> over the choice letters' tokens."""
    dev = local(next(model.parameters())).device
    idx, correct = _my_indices(task, max_examples), 0
    for s in range(0, len(idx), batch_size):
        convs = [task[i] for i in idx[s:s + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        x = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p)
        logits = model(x.to(dev))
        for i, (conv, p) in enumerate(zip(convs, prompts)):
            letter_ids = [tokenizer.encode(letter)[0] for letter in conv["letters"]]
            pick = logits[i, len(p) - 1, letter_ids].argmax().item()
            correct += task.evaluate(conv, conv["letters"][pick])
    correct, total = all_reduce_sum([correct, len(idx)])
    return correct / max(total, 1)

def generative_accuracy(engine, tokenizer, task, max_examples=None, max_tokens=256, stage="eval", batch_size=32):
    """Accuracy of greedy Engine completions (batch_size prompts decoded together) scored by task.evaluate (or
    evaluate_many when the task has it); a scoring function that raises becomes a TaskError naming the example."""
    idx, many, correct = _my_indices(task, max_examples), hasattr(task, "evaluate_many"), 0
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        convs = [task[i] for i in chunk]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        results = engine.generate_many(prompts, max_tokens=max_tokens, temperature=0.0, seed=42 + chunk[0])
        pairs = [(conv, tokenizer.decode(seqs[0][len(p):])) for conv, p, (seqs, _) in zip(convs, prompts, results)]
        try:
            if many:
                scores = [int(v) for v in task.evaluate_many(pairs)]
            else:
                scores = []
                for i, (conv, text) in zip(chunk, pairs):
                    scores.append(int(task.evaluate(conv, text)))
        except Exception as e:  # noqa: BLE001
            where = f"one of examples {chunk[0]}..{chunk[-1]}" if many else f"example {i}"
            raise TaskError(f"[{stage}] scoring function of task {task.name} raised on {where}: "
                            f"{type(e).__name__}: {e}") from e
        correct += sum(map(bool, scores))
    correct, total = all_reduce_sum([correct, len(idx)])
    return correct / max(total, 1)

# The real chat tasks, their HF dataset (repo, config) and the file stems a local folder may hold them under, first
# choice first: <config>_<split> (ARC's HF config is the subset), or as the shared real-data folder and the embedded
# sample name them (the dataset in front; ARC's test split rebuilt there, "_reconstructed", see its README).
CHAT_FILES = {"arc_easy": ("ARC-Easy_test", "ARC-Easy_test_reconstructed"),
              "arc_challenge": ("ARC-Challenge_test", "ARC-Challenge_test_reconstructed"),
              "mmlu": ("mmlu_all_test", "all_test"), "gsm8k": ("gsm8k_main_test", "main_test"),
              "humaneval": ("humaneval_test", "openai_humaneval_test")}
REAL_CHAT_TASKS = tuple(CHAT_FILES)
TASK_TITLES = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "mmlu": "MMLU", "gsm8k": "GSM8K",
               "humaneval": "HumanEval"}
HF_DATASETS = {"arc_easy": ("allenai/ai2_arc", "ARC-Easy"), "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
               "mmlu": ("cais/mmlu", "all"), "gsm8k": ("openai/gsm8k", "main")}

def chat_files(data_dir):
    """{task name: path} for each real chat task whose file (<stem>.parquet or <stem>.jsonl, CHAT_FILES) is in
    data_dir or data_dir/chat. UserError when data_dir is not a folder."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: not a folder")
    found = {}
    for name, stems in CHAT_FILES.items():
        paths = (find_file(folder, stem) for folder in (data_dir, os.path.join(data_dir, "chat")) for stem in stems)
        if path := next(filter(None, paths), None):
            found[name] = path
    return found

def run_chat_eval(model, tokenizer, task_names, max_examples=100, max_tokens=256, stage="eval", files=None):
    """Accuracy of every named task's test split plus ChatCORE -> dict {task: accuracy, "chatcore": float,
    "details": {task: {accuracy, chance, centred, n, seconds}}}, printing a line per task and the table. files:
    {task: local file} read instead of the HF hub."""
    engine, files = Engine(model, tokenizer), files or {}
    results, chances, details = {}, {}, {}
    for name in task_names:
        t0 = time.time()
        task = get_task(name, split="test", files=[files[name]] if name in files else None)
        if task.eval_type == "categorical":
            acc = categorical_accuracy(model, tokenizer, task, max_examples)
        else:
            acc = generative_accuracy(engine, tokenizer, task, max_examples, max_tokens=max_tokens, stage=stage)
        results[name], chances[name] = acc, 0.25 if task.eval_type == "categorical" else 0.0
        n = len(task) if max_examples is None else min(len(task), max_examples)
        details[name] = d = dict(accuracy=acc, chance=chances[name], centred=centred(acc, chances[name]), n=n,
                                 seconds=time.time() - t0, file=files.get(name))
        print0(f"[{stage}] {name}: {acc:.4f} (chance {d['chance']:.2f}, {n} examples, {d['seconds']:.1f}s)")
    score = chatcore(results, chances)
    table = [f"{'Task':<16} {'Accuracy':>9} {'Chance':>7} {'Centred':>9} {'Items':>6} {'Time':>8}"]
    table += [f"{name:<16} {d['accuracy']:>9.4f} {d['chance']:>7.2f} {d['centred']:>+9.4f} {d['n']:>6} "
              f"{d['seconds']:>7.1f}s" for name, d in details.items()]
    table.append(f"{'ChatCORE':<16} {'':>9} {'':>7} {score:>+9.4f}")
    print0(f"[{stage}] per task:\n" + "\n".join(table))
    return dict(results, chatcore=score, details=details)

def present_real_tasks():
    """Real tasks whose test files are already in the cache (never downloads)."""
    return [name for name, (repo, config) in HF_DATASETS.items()
            if os.path.exists(os.path.join(cache_dir(repo.replace("/", "__"), config, "test"), "COMPLETE"))]

def core_source(data_dir=None):
    """Which CORE to run -> (kind, folder): ("bundle", dir) when data_dir holds core.yaml, or without data_dir
    ("auto"), $TRITONCHAT_HOME/eval_bundle or nanochat's ($NANOCHAT_BASE_DIR or ~/.cache/nanochat, /eval_bundle, from
    https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip); ("raw", dir) for raw dataset files in
    data_dir (or data_dir/core); else ("sample", SAMPLE_DIR). UserError when data_dir holds neither."""
    if data_dir in (None, "auto"):
        nano = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
        bundles = [d for d in (home_dir(), nano) if os.path.isfile(os.path.join(d, "eval_bundle", "core.yaml"))]
        return ("bundle", os.path.join(bundles[0], "eval_bundle")) if bundles else ("sample", SAMPLE_DIR)
    if data_dir == "sample":
        return "sample", SAMPLE_DIR
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: not a folder")
    if os.path.isfile(os.path.join(data_dir, "core.yaml")):
        return "bundle", data_dir
    if any(find_file(folder, t.stem) for folder in (data_dir, os.path.join(data_dir, "core"))
           for t in core_eval.RAW_TASKS):
        return "raw", data_dir
    raise UserError(f"--data-dir {data_dir}: neither an eval bundle (core.yaml) nor raw CORE dataset files "
                    f"(e.g. {core_eval.RAW_TASKS[0].stem}.parquet, here or in core/)")

def describe_core(result):
    """One line saying which CORE a dclm_core result is: name, data, items per task, crop, tasks."""
    kind, where = result["source"], result["where"]
    notes = [{"bundle": f"the DCLM eval bundle at {where}", "raw": f"the raw datasets in {where}",
              "sample": "the embedded sample of the raw datasets (train/tasks/realdata, 100 seeded rows each)"}[kind],
             "all items" if result["max_per_task"] is None else f"at most {result['max_per_task']} items a task"]
    if result.get("max_seq_len"):
        notes.append(f"prompts cropped to their last {result['max_seq_len']} tokens")
    if result["name"] != "CORE":
        notes.append(f"{len(result['tasks'])} of CORE's 22 tasks, not nanochat's CORE")
    return f"{result['name']} on {'; '.join(notes)}: {', '.join(result['tasks'])}"

def run_core(model, tokenizer, data_dir=None, max_per_task=None, stage="eval", max_seq_len=None):
    """CORE or CORE-<n> of a base model (core_source(data_dir)) -> dict {name, score, source, where, max_per_task,
    max_seq_len, tasks: {label: {accuracy, centered, baseline, n, num_fewshot, kind, seconds}}, seconds}, printing
    a line per task and the table. max_seq_len: as evaluate_core's. Collective under torch.distributed."""
    kind, where = core_source(data_dir)
    t0 = time.time()
    tasks = core_eval.load_tasks(where, max_per_task)
    res = core_eval.evaluate_core(model, tokenizer, tasks, max_per_task=max_per_task, max_seq_len=max_seq_len,
                                  log=lambda line: print0(f"[{stage}] {line}"))
    fields = ("accuracy", "centered", "baseline", "n", "num_fewshot", "kind", "seconds")
    out = dict(name=res["name"], score=res["score"], source=kind, where=where, max_per_task=max_per_task,
               max_seq_len=max_seq_len, tasks={k: {f: v[f] for f in fields} for k, v in res["tasks"].items()},
               seconds=time.time() - t0)
    print0(f"[{stage}] {describe_core(out)}\n{core_eval.format_results(res)}")
    return out

def run_base_eval(model, tokenizer, val_batches=None, task_names=None, max_examples=100, stage="eval", core=None,
                  max_per_task=None, core_max_seq_len=None):
    """val bpb (when val_batches is given), CORE-style centred accuracies and CORE -> dict. core: None to skip
    CORE, else run_core's data_dir ("auto", "sample" or a folder); its result is under "dclm_core"."""
    out = {}
    if val_batches is not None:
        out["val_bpb"] = evaluate_bpb(model, val_batches, token_bytes(tokenizer))
        print0(f"[{stage}] val bpb: {out['val_bpb']:.4f}")
    scores = []
    for name in task_names or (["number_mc", "arithmetic"] + present_real_tasks()):
        task = get_task(name, split="test")
        kind = "mc" if task.eval_type == "categorical" else "lm"
        acc = out[f"core_{name}"] = core_task_score(model, tokenizer, task, kind, max_examples=max_examples)
        scores.append(centred(acc, 1.0 / len(task[0]["choices"]) if kind == "mc" else 0.0))
        print0(f"[{stage}] CORE-style {name}: acc {acc:.4f} (centred {scores[-1]:+.4f})")
    out["core"] = sum(scores) / max(1, len(scores))
    if core is not None:
        out["dclm_core"] = run_core(model, tokenizer, core, max_per_task, stage=stage, max_seq_len=core_max_seq_len)
    return out

def evaluate_checkpoint(mode, source, run=None, tasks=None, max_examples=100, max_tokens=256, val_batches=20,
                        device=None, stage="evaluate", data_dir=None, core=None, max_per_task=None,
                        core_max_seq_len=None):
    """Load the newest checkpoint of `source` as a plain model (every rank, under torchrun) and run the base or chat
    evaluation -> dict. base: val bpb (val_batches batches), CORE-style on `tasks` (default: embedded + cached real)
    and CORE from `core` (run_core's data_dir; None: skipped), prompts cropped to core_max_seq_len tokens ("trained":
    the checkpoint's sequence_len). chat: `tasks` (default: the real chat tasks found in data_dir, else embedded +
    cached real ones)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    files = chat_files(data_dir) if mode == "chat" and data_dir else {}
    if mode == "base" and core is not None:
        core_source(core)  # a wrong folder fails before the model loads
    if mode == "chat" and data_dir and not tasks and not files:
        raise UserError(f"--data-dir {data_dir}: no chat-eval files (expected e.g. "
                        f"{', '.join(CHAT_FILES[t][0] + '.parquet' for t in REAL_CHAT_TASKS)}, here or in chat/)")
    model, tokenizer, meta = load_model(source, device=device, run=run)
    info = dist_info()
    t0 = time.time()
    if mode == "base":
        T = meta["config"]["sequence_len"]
        loader = TokenLoader(tokenizer, load_corpus("val"), 4, T, rank=info.rank, world_size=info.world_size,
                             device=device, loop=False)  # iteration ends at the corpus' end
        batches = list(itertools.islice(loader, val_batches))
        res = run_base_eval(model, tokenizer, batches, tasks, max_examples, stage=stage, core=core,
                            max_per_task=max_per_task,
                            core_max_seq_len=T if core_max_seq_len == "trained" else core_max_seq_len)
    else:
        if not tasks:
            tasks = list(files) if data_dir else (["arithmetic", "spelling", "identity", "number_mc"]
                                                   + present_real_tasks())
        res = run_chat_eval(model, tokenizer, tasks, max_examples, max_tokens, stage=stage, files=files)
    res["eval_seconds"] = time.time() - t0
    return res

def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_argument(p)
    p.add_argument("--mode", choices=("base", "chat"), default="chat")
    p.add_argument("--source", help="checkpoint stage to evaluate: base|mid|sft|rl (default: base for --mode base, "
                   "else sft)")
    p.add_argument("--run", help="run name (default: the newest run of the stage)")
    p.add_argument("--tasks", help="comma-separated task names (default: embedded + cached real tasks; "
                   "chat with --data-dir: the real tasks found there)")
    p.add_argument("--data-url", help="base URL of the task datasets ($TRITONCHAT_DATA_URL)")
    p.add_argument("--data-dir", help="local evaluation data, read offline. base: an eval bundle (core.yaml) -> CORE, "
                   "or raw dataset files (here or in core/) -> CORE-10; chat: ARC/MMLU/GSM8K/HumanEval files (here or "
                   "in chat/). train/tasks/realdata is the embedded sample, laid out so (core/, chat/)")
    p.add_argument("--max-examples", type=int, default=100, help="examples per task (chat; base: CORE-style)")
    p.add_argument("--max-per-task", type=int, help="base: items per CORE task, the first of each task's seeded "
                   "shuffle (default: all)")
    p.add_argument("--max-seq-len", help="base: crop CORE prompts to their last N tokens, or 'trained' for the "
                   "checkpoint's sequence length (default: no crop below the rotary table, as nanochat)")
    p.add_argument("--no-core", action="store_true", help="base: skip CORE")
    p.add_argument("--max-tokens", type=int, default=256, help="generation budget for generative tasks")
    p.add_argument("--val-batches", type=int, default=20, help="base mode: batches of the held-out corpus")
    p.add_argument("--out", help="write the metrics as JSON here")
    args = p.parse_args(argv)
    kernels.set_mode(args.kernels)
    if args.data_url:
        os.environ["TRITONCHAT_DATA_URL"] = args.data_url
    if args.max_per_task is not None and args.max_per_task < 1:
        p.error("--max-per-task must be at least 1 (leave it out for all items)")
    if args.max_seq_len not in (None, "trained"):
        if not args.max_seq_len.isdigit() or int(args.max_seq_len) < 2:
            p.error(f"--max-seq-len must be a number of tokens (>= 2) or 'trained', got {args.max_seq_len!r}")
        args.max_seq_len = int(args.max_seq_len)

    def go():
        info = init_distributed()
        source = args.source or ("base" if args.mode == "base" else "sft")
        res = evaluate_checkpoint(args.mode, source, args.run, args.tasks.split(",") if args.tasks else None,
                                  args.max_examples, args.max_tokens, args.val_batches, info.device,
                                  data_dir=args.data_dir, core=None if args.no_core else (args.data_dir or "auto"),
                                  max_per_task=args.max_per_task, core_max_seq_len=args.max_seq_len)
        print0(json.dumps(res, indent=1))
        if args.out and info.rank == 0:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        cleanup()
        return res
    return run_main(go)

if __name__ == "__main__":
    main()
