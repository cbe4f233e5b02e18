"""Chat with a tritonchat checkpoint in the terminal, streaming token by token (make chat).

    python -m model.chat                            # REPL with the newest SFT checkpoint
    python -m model.chat --source rl -p "What is 12 * 7?"      # one-shot: print the answer and exit
    python -m model.chat --source base --temperature 0 --max-tokens 64 --kernels eager

The checkpoint is the newest of `--source` under $TRITONCHAT_HOME/checkpoints/<stage>/ (`--run` picks a run). REPL
commands: /help, /clear, /quit or /exit (or Ctrl-D); Ctrl-C stops an answer, or clears the line at the prompt. The
context is the model's trained sequence_len; --max-tokens unset = the room the conversation leaves. A history that no
longer fits loses its oldest turns (the system message stays); a message too long on its own is refused with a note.
A bad flag is one line on stderr and exit code 2. The python tool's mode (jailed, disabled, unsafe) is printed."""
import argparse
import sys

import torch

import kernels
from model import sandbox
from model.checkpoint import find_last_checkpoint, load_model
from model.common import ArgumentParser, UserError, float_between, home_dir, int_at_least
from model.engine import Engine
from model.tokenizer import IncrementalDecoder

TRAIN_COMMANDS = {"base": "python -m train.base --preset tiny   (or `make run` for the whole tiny pipeline)",
                  "mid": "python -m train.mid", "sft": "python -m train.sft", "rl": "python -m train.rl"}
COMMANDS = {"/help": "this list", "/clear": "start a new conversation", "/quit": "leave (also /exit or Ctrl-D)"}

def device_type(text):
    """argparse type: cpu, cuda, cuda:N or mps, and only if this machine has it."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (torch sees none); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text

def context_of(engine):
    """The context a conversation may fill: what the model was trained on (its rotary tables reach further)."""
    return min(engine.model.config.sequence_len, engine.max_context)

def default_reserve(context):
    """Room kept for an answer of unset length when old turns have to go: a quarter of the context."""
    return max(1, context // 4)

def fit_conversation(tokenizer, messages, context, reserve):
    """messages [{"role", "content"}] ending with the user's -> (prompt ids ending in <|assistant_start|>, number
    of messages dropped): the oldest turns (a user message and the assistant messages after it) go until the prompt
    plus `reserve` tokens fits `context`; the leading system message and the last user turn stay, so the prompt may
    still not fit (the caller refuses it). ValueError from the tokenizer for a conversation it cannot render."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    while True:
        prompt = tokenizer.render_for_completion({"messages": system + rest})
        nxt = next((k for k in range(1, len(rest)) if rest[k]["role"] == "user"), None)
        if len(prompt) + reserve <= context or nxt is None:
            return prompt, len(messages) - len(system) - len(rest)
        rest = rest[nxt:]

def load_chat_model(source, device=None, run=None):
    """(model, tokenizer, meta) of the newest `source` checkpoint; a clear message (SystemExit) if there is none."""
    if find_last_checkpoint(source, run) is None:
        where = f"{home_dir()}/checkpoints/{source}" + (f"/{run}" if run else "")
        raise SystemExit(f"no {source} checkpoint found under {where}.\nTrain one first: {TRAIN_COMMANDS[source]}"
                           f"\n(or point TRITONCHAT_HOME at the directory that holds your checkpoints)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer, meta = load_model(source, device=device, run=run)
    except UserError as e:  # a corrupt or incomplete checkpoint: the message says what to do
        raise SystemExit(str(e)) from None
    if tokenizer is None:
        raise SystemExit(f"no tokenizer found for the {source} checkpoint; train one: python -m train.tokenizer")
    return model, tokenizer, meta

def assistant_content(tokenizer, ids):
    """Completion ids (no stop token) -> message content: a str, or parts when the model used the python tool, so
    the next turn renders the tool call and its forced output exactly as the model produced them."""
    sp = tokenizer.special_tokens
    kinds = {sp["<|python_start|>"]: ("python", sp["<|python_end|>"]),
             sp["<|output_start|>"]: ("python_output", sp["<|output_end|>"])}
    parts, text, kind, end = [], [], "text", None
    for t in ids:
        if t == end or (end is None and t in kinds):  # a tool part starts or ends
            parts.append({"type": kind, "text": tokenizer.decode(text)})
            (kind, end), text = kinds.get(t, ("text", None)), []
        else:
            text.append(t)
    parts.append({"type": kind, "text": tokenizer.decode(text)})  # an unterminated tool call gets closed
    parts = [p for p in parts if p["text"] or p["type"] != "text"]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts

def respond(engine, tokenizer, prompt, args):
    """Stream the answer to `prompt` (ids) to stdout, at most args.max_tokens (None: the room left) -> its content."""
    room = context_of(engine) - len(prompt)
    max_tokens = room if args.max_tokens is None else min(args.max_tokens, room)
    decoder = IncrementalDecoder(tokenizer)
    for tokens, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=args.temperature,
                                     top_k=args.top_k, seed=args.seed):
        if tokens[0] is None or tokens[0] in engine.stop_ids:
            break
        print(decoder.add(tokens[0]), end="", flush=True)
    print(decoder.flush(), flush=True)
    return assistant_content(tokenizer, decoder.ids)

def _prompt_for(engine, tokenizer, messages, args):
    """The conversation fit into the context -> prompt ids (dropping old turns of `messages`, said), or None (said)."""
    context = context_of(engine)
    reserve = args.max_tokens if args.max_tokens is not None else default_reserve(context)
    prompt, dropped = fit_conversation(tokenizer, messages, context, reserve)
    room = context - len(prompt)
    if room < 1 or (args.max_tokens is not None and args.max_tokens > room):
        need = f" + --max-tokens {args.max_tokens}" if args.max_tokens is not None else ""
        print(f"(not sent: the message takes {len(prompt)} tokens{need}, more than the context of {context} "
              f"tokens; shorten it or /clear)")
        return None
    if dropped:
        keep = 1 if messages[0]["role"] == "system" else 0
        del messages[keep:keep + dropped]
        print(f"(the {dropped} oldest messages were dropped to fit the context of {context} tokens)")
    return prompt

def main(argv=None):
    parser = ArgumentParser(prog="python -m model.chat", description="chat with a tritonchat checkpoint")
    parser.add_argument("--source", default="sft", choices=list(TRAIN_COMMANDS), help="which stage to load")
    parser.add_argument("--run", help="checkpoint run name (default: the newest run)")
    parser.add_argument("-p", "--prompt", help="one-shot: answer this prompt and exit")
    parser.add_argument("--temperature", type=float_between(0.0, 2.0), default=0.6, help="0 = greedy, up to 2")
    parser.add_argument("--top-k", type=int_at_least(1), default=50, help="sample among the k likeliest tokens")
    parser.add_argument("--max-tokens", type=int_at_least(1), help="per answer (default: the room the context leaves)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument("--device", type=device_type, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    kernels.add_argument(parser)
    args = parser.parse_args(argv)
    kernels.set_mode(args.kernels)

    model, tokenizer, meta = load_chat_model(args.source, args.device, args.run)
    engine = Engine(model, tokenizer)
    context = context_of(engine)
    if args.max_tokens is not None and args.max_tokens >= context:
        parser.error(f"argument --max-tokens: {args.max_tokens} does not fit this model's context of {context} "
                     f"tokens (the prompt needs some too)")
    tool = sandbox.jail_status().banner
    if args.prompt is not None:
        print(tool, file=sys.stderr, flush=True)
        if (prompt := _prompt_for(engine, tokenizer, [{"role": "user", "content": args.prompt}], args)) is None:
            sys.exit(1)
        respond(engine, tokenizer, prompt, args)
        return
    print(f"tritonchat-{args.source} (step {meta.get('step')}, kernels {kernels.get_mode()}, context {context} "
          f"tokens). /help lists the commands; Ctrl-D leaves.\n{tool}", flush=True)
    messages = []
    while True:
        try:
            line = input("\nUser: ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # as a shell does: drop the line, prompt again
            print("^C")
            continue
        if not line:
            continue
        command = line.split()[0].lower() if line.startswith("/") else None
        if command is not None and (command in COMMANDS or command == "/exit" or line[1:].isidentifier()):
            if command in ("/quit", "/exit"):
                return
            if command == "/clear":
                messages.clear()
                print("(new conversation)")
            elif command == "/help":
                print("\n".join(f"  {name:8s} {what}" for name, what in COMMANDS.items()))
            else:
                print(f"(unknown command {command}; /help lists the commands)")
            continue
        messages.append({"role": "user", "content": line})
        if (prompt := _prompt_for(engine, tokenizer, messages, args)) is None:
            messages.pop()
            continue
        print("\nAssistant: ", end="", flush=True)
        try:
            messages.append({"role": "assistant", "content": respond(engine, tokenizer, prompt, args)})
        except KeyboardInterrupt:  # stop this answer, keep the session
            print("\n(interrupted)")
            messages.pop()

if __name__ == "__main__":
    main()
