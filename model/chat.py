"""Chat with a tritonchat checkpoint in the terminal, streaming token by token (make chat).

    python -m model.chat                            # REPL with the newest SFT checkpoint
    python -m model.chat --source rl -p "What is 12 * 7?"      # one-shot: print the answer and exit
    python -m model.chat --source base --temperature 0 --max-tokens 64 --kernels eager

The checkpoint is the newest of `--source` (base | mid | sft | rl) under $TRITONCHAT_HOME/checkpoints/<stage>/
(`--run` picks a run). In the REPL: `/clear` starts a new conversation, `/quit` (or Ctrl-D) leaves.
"""
import argparse
import sys

import torch

import kernels
from model.checkpoint import find_last_checkpoint, load_model
from model.common import UserError, home_dir
from model.engine import Engine
from model.tokenizer import IncrementalDecoder

# The command that produces each stage's checkpoint (said when it is missing).
TRAIN_COMMANDS = {
    "base": "python -m train.base --preset tiny   (or `make run` for the whole tiny pipeline)",
    "mid": "python -m train.mid",
    "sft": "python -m train.sft",
    "rl": "python -m train.rl",
}


class NoCheckpoint(SystemExit):
    pass


def load_chat_model(source, device=None, run=None):
    """(model, tokenizer, meta) of the newest `source` checkpoint; a clear message (SystemExit) if there is none."""
    if source not in TRAIN_COMMANDS:
        raise ValueError(f"unknown source {source!r}: choose one of {', '.join(TRAIN_COMMANDS)}")
    if find_last_checkpoint(source, run) is None:
        where = f"{home_dir()}/checkpoints/{source}" + (f"/{run}" if run else "")
        raise NoCheckpoint(f"no {source} checkpoint found under {where}.\nTrain one first: {TRAIN_COMMANDS[source]}"
                           f"\n(or point TRITONCHAT_HOME at the directory that holds your checkpoints)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer, meta = load_model(source, device=device, run=run)
    except UserError as e:  # a corrupt or incomplete checkpoint: the message says what to do
        raise NoCheckpoint(str(e)) from None
    if tokenizer is None:
        raise NoCheckpoint(f"no tokenizer found for the {source} checkpoint; train one: python -m train.tokenizer")
    return model, tokenizer, meta


def assistant_content(tokenizer, ids):
    """Completion ids (no stop token) -> message content: a str, or parts when the model used the python tool, so
    the next turn renders the tool call and its forced output exactly as the model produced them."""
    sp = tokenizer.special_tokens
    kinds = {sp["<|python_start|>"]: ("python", sp["<|python_end|>"]),
             sp["<|output_start|>"]: ("python_output", sp["<|output_end|>"])}
    parts, text, kind, end = [], [], "text", None
    for t in ids:
        if kind == "text" and t in kinds:
            parts.append({"type": "text", "text": tokenizer.decode(text)})
            (kind, end), text = kinds[t], []
        elif kind != "text" and t == end:
            parts.append({"type": kind, "text": tokenizer.decode(text)})
            kind, text = "text", []
        else:
            text.append(t)
    parts.append({"type": kind, "text": tokenizer.decode(text)})  # an unterminated tool call gets closed
    parts = [p for p in parts if p["text"] or p["type"] != "text"]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def respond(engine, tokenizer, conversation, args, out=None):
    """Stream the assistant's answer to `conversation` to `out`; returns the message content (stop token dropped;
    a str, or parts if the python tool was used)."""
    prompt = tokenizer.render_for_completion(conversation)
    out = out or sys.stdout
    decoder = IncrementalDecoder(tokenizer)
    for tokens, _ in engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        token = tokens[0]
        if token is None or token in engine.stop_ids:
            break
        out.write(decoder.add(token))
        out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    return assistant_content(tokenizer, decoder.ids)


def main(argv=None):
    parser = argparse.ArgumentParser(description="chat with a tritonchat checkpoint",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default="sft", choices=list(TRAIN_COMMANDS), help="which stage to load")
    parser.add_argument("--run", default=None, help="checkpoint run name (default: the newest run)")
    parser.add_argument("-p", "--prompt", default=None, help="one-shot: answer this prompt and exit")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=512, help="per answer")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    kernels.add_argument(parser)
    args = parser.parse_args(argv)
    kernels.set_mode(args.kernels)

    model, tokenizer, meta = load_chat_model(args.source, args.device, args.run)
    engine = Engine(model, tokenizer)
    conversation = {"messages": []}
    if args.prompt is not None:
        conversation["messages"].append({"role": "user", "content": args.prompt})
        respond(engine, tokenizer, conversation, args)
        return
    print(f"tritonchat-{args.source} (step {meta.get('step')}, kernels {kernels.get_mode()}). "
          "/clear = new conversation, /quit or Ctrl-D = leave.", flush=True)
    while True:
        try:
            line = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit", "quit", "exit"):
            return
        if line == "/clear":
            conversation = {"messages": []}
            print("(new conversation)")
            continue
        if not line:
            continue
        conversation["messages"].append({"role": "user", "content": line})
        print("\nAssistant: ", end="", flush=True)
        try:
            answer = respond(engine, tokenizer, conversation, args)
        except KeyboardInterrupt:  # stop this answer, keep the session
            print("\n(interrupted)")
            conversation["messages"].pop()
            continue
        conversation["messages"].append({"role": "assistant", "content": answer})
        used = len(tokenizer.render_conversation(conversation, max_tokens=None)[0])
        if used + args.max_tokens >= engine.max_context:
            print(f"(the conversation fills the context of {engine.max_context} tokens: starting a new one)")
            conversation = {"messages": []}


if __name__ == "__main__":
    main()
