"""Evaluation: base models (val bits-per-byte, CORE-style in-context scoring) and chat models (ChatCORE).

    python -m train.evaluate --mode base --source base                  # val bpb + CORE-style on present tasks
    python -m train.evaluate --mode chat --source sft                   # ARC/MMLU categorical, GSM8K/HumanEval/...
    torchrun --nproc_per_node=8 -m train.evaluate --mode chat --source rl --tasks gsm8k,humaneval

Base metrics
- val bpb = sum of next-token losses (nats) / (ln 2 * bytes of the target tokens) on the held-out corpus; special
  tokens count zero bytes and are skipped, so the number does not depend on the vocabulary size.
- CORE-style in-context scoring (DCLM's CORE, as nanochat): multiple choice = few-shot "Question: ...\nAnswer: <x>"
  prompts, the choice whose continuation has the lowest mean loss wins; language modelling = the continuation
  (the answer after "####") must be the model's greedy prediction token for token. Centred accuracy
  (acc - chance) / (1 - chance), CORE = mean over tasks. Runs on the embedded tasks and on every real task whose
  files are already cached (or those named with --tasks).
Chat metrics
- categorical (ARC, MMLU, number_mc): logits at <|assistant_start|> restricted to the choice letters, argmax;
- generative (GSM8K, HumanEval, arithmetic, spelling, identity): sample with the Engine (tools live), score with the
  task (HumanEval runs its unit tests in the sandbox);
- ChatCORE = mean over tasks of (acc - chance) / (1 - chance), chance 0.25 for multiple choice, 0 for generative.
Examples are split across ranks (i % world == rank) and the counts all-reduced.
"""
import argparse
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
from model.common import UserError, all_reduce_sum, dist_info, local, print0
from model.engine import Engine
from model.tokenizer import SPECIAL_TOKENS
from train.data import TokenLoader, load_corpus
from train.distributed import cleanup, init_distributed
from train.loop import run_main
from train.tasks import TaskError, get_task
from train.tasks.common import cache_dir, completion_text, extract_answer

MC_CHANCE = 0.25


def centred(acc, chance):
    return (acc - chance) / (1.0 - chance)


def chatcore(results, chances):
    """Mean centred accuracy; results and chances are dicts keyed by task name."""
    return sum(centred(results[k], chances[k]) for k in results) / max(1, len(results))


# ------------------------------------------------------------------------------------------------ base: val bpb
def token_bytes(tokenizer):
    """int64 tensor (vocab,): UTF-8 byte length of every token, 0 for special tokens (not counted in bpb)."""
    if hasattr(tokenizer, "token_bytes"):  # model.tokenizer.Tokenizer knows the exact bytes of partial characters
        return torch.tensor(tokenizer.token_bytes(), dtype=torch.long)
    special = set()
    for name in getattr(tokenizer, "SPECIAL_TOKENS", None) or SPECIAL_TOKENS:
        try:
            special.add(tokenizer.encode_special(name))
        except Exception:  # noqa: BLE001 - a tokenizer without that special
            pass
    special.add(tokenizer.bos_token_id)
    nbytes = [0 if i in special else len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size)]
    return torch.tensor(nbytes, dtype=torch.long)


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes):
    """Bits per byte over an iterable of (x, y): sum of nats / (ln 2 · bytes of the target tokens); targets that
    are special tokens (0 bytes) or -1 are left out. Summed over all ranks (collective under torchrun); every stage
    logs this same number, so stage logs and the report card agree."""
    was_training = model.training
    model.eval()
    nats = None
    nbytes = None
    it = iter(batches)
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
        n, b = (loss * (tb > 0)).sum(), tb.sum().to(loss.dtype)
        nats, nbytes = (n, b) if nats is None else (nats + n, nbytes + b)
    if nats is None:
        raise UserError("evaluate_bpb: no validation batches (the validation set is smaller than one batch)")
    stats = torch.stack([nats, nbytes]).double()
    if world > 1:
        dist.all_reduce(stats)
    model.train(was_training)
    return (stats[0] / (math.log(2) * stats[1])).item()


# ------------------------------------------------------------------------------------------------ base: CORE-style
@torch.no_grad()
def continuation_losses(model, contexts, continuations):
    """Mean loss of each continuation after its context and whether the greedy prediction matches it exactly.
    One right-padded batch; returns (losses list, exact list)."""
    rows = [c + k for c, k in zip(contexts, continuations)]
    T = max(len(r) for r in rows)
    dev = local(next(model.parameters())).device
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (c, k) in enumerate(zip(contexts, continuations)):
        r = c + k
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


def _mc_text(conv):
    return conv["question"], conv["choices"], conv["answer"]


def core_task_score(model, tokenizer, task, kind, num_shots=3, max_examples=100, seed=1234):
    """CORE-style accuracy of a base model on a task. kind "mc" uses the conversations' question/choices/answer;
    kind "lm" uses user question -> assistant text, the continuation being the number after '####'."""
    n = min(len(task), max_examples)
    info = dist_info()
    rank, world = info.rank, info.world_size
    bos = tokenizer.bos_token_id
    correct = total = 0
    for i in range(rank, n, world):
        rng = random.Random(seed + i)
        shots = [task[j] for j in rng.sample([j for j in range(len(task)) if j != i], min(num_shots, len(task) - 1))]
        conv = task[i]
        if kind == "mc":
            prefix = "".join(f"Question: {q}\nAnswer: {c[a]}\n\n" for q, c, a in map(_mc_text, shots))
            q, choices, answer = _mc_text(conv)
            ctx = [bos] + tokenizer.encode(prefix + f"Question: {q}\nAnswer:")
            conts = [tokenizer.encode(" " + c) for c in choices]
            losses, _ = continuation_losses(model, [ctx] * len(choices), conts)
            correct += int(min(range(len(choices)), key=losses.__getitem__) == answer)
        else:
            def qa(c):
                text = completion_text(c["messages"][-1]["content"])
                return c["messages"][0]["content"], text[:text.rindex("#### ") + 5], extract_answer(text)
            prefix = "".join(f"Question: {q}\nAnswer: {s}{a}\n\n" for q, s, a in map(qa, shots))
            q, sol, ans = qa(conv)
            ctx = [bos] + tokenizer.encode(prefix + f"Question: {q}\nAnswer: {sol}")
            _, exact = continuation_losses(model, [ctx], [tokenizer.encode(ans)])
            correct += int(exact[0])
        total += 1
    correct, total = all_reduce_sum([correct, total])
    return correct / max(total, 1)


# ------------------------------------------------------------------------------------------------ chat
def _prompt_ids(tokenizer, conv):
    return tokenizer.render_for_completion(conv)


@torch.no_grad()
def categorical_accuracy(model, tokenizer, task, max_examples=None, batch_size=8):
    """Multiple choice: argmax of the logits after <|assistant_start|> over the choice letters' tokens."""
    n = len(task) if max_examples is None else min(len(task), max_examples)
    info = dist_info()
    rank, world = info.rank, info.world_size
    dev = local(next(model.parameters())).device
    idx = list(range(rank, n, world))
    correct = total = 0
    for s in range(0, len(idx), batch_size):
        convs = [task[i] for i in idx[s:s + batch_size]]
        prompts = [_prompt_ids(tokenizer, c) for c in convs]
        T = max(map(len, prompts))
        x = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p)
        logits = model(x.to(dev))
        for i, (conv, p) in enumerate(zip(convs, prompts)):
            letter_ids = [tokenizer.encode(letter)[0] for letter in conv["letters"]]
            pick = logits[i, len(p) - 1, letter_ids].argmax().item()
            correct += task.evaluate(conv, conv["letters"][pick])
            total += 1
    correct, total = all_reduce_sum([correct, total])
    return correct / max(total, 1)


def generative_accuracy(engine, tokenizer, task, max_examples=None, num_samples=1, max_tokens=256,
                        temperature=0.0, top_k=None, seed=42, stage="eval", batch_size=32):
    """Generative: sample with the Engine (batch_size prompts decoded together), decode each completion, score it
    with the task; an example counts as solved when any of its num_samples completions is right
    (pass@num_samples). Returns accuracy."""
    n = len(task) if max_examples is None else min(len(task), max_examples)
    info = dist_info()
    rank, world = info.rank, info.world_size
    idx = list(range(rank, n, world))
    correct = total = 0
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        convs = [task[i] for i in chunk]
        prompts = [_prompt_ids(tokenizer, c) for c in convs]
        results = engine.generate_many(prompts, num_samples=num_samples, max_tokens=max_tokens,
                                       temperature=temperature, top_k=top_k, seed=seed + chunk[0])
        for i, conv, prompt, (seqs, _) in zip(chunk, convs, prompts, results):
            ok = 0
            for seq in seqs:
                text = tokenizer.decode(seq[len(prompt):])
                try:
                    ok |= int(task.evaluate(conv, text))
                except Exception as e:  # noqa: BLE001
                    raise TaskError(f"[{stage}] scoring function of task {task.name} raised on example {i}: "
                                    f"{type(e).__name__}: {e}") from e
            correct += ok
            total += 1
    correct, total = all_reduce_sum([correct, total])
    return correct / max(total, 1)


def chance_of(task):
    return MC_CHANCE if task.eval_type == "categorical" else 0.0


def run_chat_eval(model, tokenizer, task_names, max_examples=100, max_tokens=256, stage="eval", engine=None):
    """Accuracy of every named task's test split plus ChatCORE -> dict."""
    engine = engine or Engine(model, tokenizer)
    results, chances = {}, {}
    for name in task_names:
        task = get_task(name, split="test")
        if task.eval_type == "categorical":
            acc = categorical_accuracy(model, tokenizer, task, max_examples)
        else:
            acc = generative_accuracy(engine, tokenizer, task, max_examples, max_tokens=max_tokens, stage=stage)
        results[name], chances[name] = acc, chance_of(task)
        print0(f"[{stage}] {name}: {acc:.4f}")
    return dict(results, chatcore=chatcore(results, chances))


def present_real_tasks():
    """Real tasks whose test files are already in the cache (never downloads)."""
    found = []
    for name, (repo, config, split) in {"arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
                                        "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
                                        "mmlu": ("cais/mmlu", "all", "test"),
                                        "gsm8k": ("openai/gsm8k", "main", "test")}.items():
        if os.path.exists(os.path.join(cache_dir(repo.replace("/", "__"), config, split), "COMPLETE")):
            found.append(name)
    return found


def run_base_eval(model, tokenizer, val_batches=None, task_names=None, max_examples=100, num_shots=3, stage="eval"):
    """val bpb (when val_batches is given) and CORE-style centred accuracies -> dict."""
    out = {}
    if val_batches is not None:
        out["val_bpb"] = evaluate_bpb(model, val_batches, token_bytes(tokenizer))
        print0(f"[{stage}] val bpb: {out['val_bpb']:.4f}")
    names = task_names or (["number_mc", "arithmetic"] + present_real_tasks())
    scores = []
    for name in names:
        task = get_task(name, split="test")
        kind = "mc" if task.eval_type == "categorical" else "lm"
        acc = core_task_score(model, tokenizer, task, kind, num_shots=num_shots, max_examples=max_examples)
        chance = 1.0 / len(task[0]["choices"]) if kind == "mc" else 0.0
        out[f"core_{name}"] = acc
        scores.append(centred(acc, chance))
        print0(f"[{stage}] CORE-style {name}: acc {acc:.4f} (centred {scores[-1]:+.4f})")
    out["core"] = sum(scores) / max(1, len(scores))
    return out


def val_batches_for(tokenizer, B, T, device, max_batches, rank=0, world=1):
    """Batches of the held-out embedded corpus (loop=False, at most max_batches)."""
    loader = TokenLoader(tokenizer, load_corpus("val"), B, T, rank=rank, world_size=world, device=device, loop=False)
    out = []
    for _ in range(max_batches):
        try:
            out.append(loader.next_batch())
        except StopIteration:
            break
    return out


def evaluate_checkpoint(mode, source, run=None, tasks=None, max_examples=100, max_tokens=256, val_batches=20,
                        device=None, stage="evaluate"):
    """Load the newest checkpoint of `source` as a plain model and run the base or chat evaluation -> dict.
    Works in one process or on every rank under torchrun (examples split across ranks)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, meta = load_model(source, device=device, run=run)
    info = dist_info()
    rank, world = info.rank, info.world_size
    t0 = time.time()
    if mode == "base":
        T = meta["config"]["sequence_len"]
        batches = val_batches_for(tokenizer, 4, T, device, val_batches, rank, world)
        res = run_base_eval(model, tokenizer, batches, tasks, max_examples, stage=stage)
    else:
        tasks = tasks or (["arithmetic", "spelling", "identity", "number_mc"] + present_real_tasks())
        res = run_chat_eval(model, tokenizer, tasks, max_examples, max_tokens, stage=stage)
    res["eval_seconds"] = time.time() - t0
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_argument(p)
    p.add_argument("--mode", choices=("base", "chat"), default="chat")
    p.add_argument("--source", default="sft", help="checkpoint stage to evaluate: base|mid|sft|rl")
    p.add_argument("--run", default=None, help="run name (default: the newest run of the stage)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: embedded + cached real tasks)")
    p.add_argument("--data-url", default=None, help="base URL of the task datasets ($TRITONCHAT_DATA_URL)")
    p.add_argument("--max-examples", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=256, help="generation budget for generative tasks")
    p.add_argument("--val-batches", type=int, default=20, help="base mode: batches of the held-out corpus")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = p.parse_args(argv)
    kernels.set_mode(args.kernels)
    if args.data_url:
        os.environ["TRITONCHAT_DATA_URL"] = args.data_url

    def go():
        info = init_distributed()
        res = evaluate_checkpoint(args.mode, args.source, args.run, args.tasks.split(",") if args.tasks else None,
                                  args.max_examples, args.max_tokens, args.val_batches, info.device)
        print0(json.dumps(res, indent=1))
        if args.out and info.rank == 0:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        cleanup()
        return res
    return run_main(go)


if __name__ == "__main__":
    main()
