"""Chat with a trained model in the terminal (on a compute node: `srun --pty python -m nanochat.chat_cli`).

    python -m nanochat.chat_cli [RUN] [--stage base|sft|rl] [--runs-root DIR] [--checkpoint DIR] [-p PROMPT]
    python -m nanochat.chat_cli runs_root=DIR run_name=RUN stage=sft        # the launcher's words work too

Without a run: the newest run; without a stage: rl, else sft, else base. A base model continues text; a chat
model (sft, rl) answers in turns, and its calculator tool calls are run by the engine (shown as `<<2*2=4>>`).
Type 'clear' to start a new conversation, 'quit' or Ctrl-D to leave; Ctrl-C stops a reply (a line saying so is
printed at the start). In a terminal, lines are edited with readline (arrows, Ctrl-R to search) and kept across
sessions in ~/.local/state/nanochat/chat_history ($XDG_STATE_HOME/nanochat/chat_history where that is set).
"""

import argparse
import os
import sys
from pathlib import Path

from nanochat.chat_args import add_model_arguments, apply_words
from nanochat.chat_text import ReplyText
from nanochat.common import UserError

HISTORY_LINES = 1000


def history_file() -> Path:
    """$XDG_STATE_HOME/nanochat/chat_history (default ~/.local/state/...): in the home, so one history follows
    you to every node of a cluster."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "nanochat" / "chat_history"


def start_history() -> Path | None:
    """Line editing with readline, and the history file read now and written at exit; None (and no editing)
    where readline is missing or the input is not a terminal (piped lines are no history)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # a Python built without it: plain input()
        return None
    import atexit

    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # the prompts are private: never world-readable
        readline.read_history_file(path)
    except OSError as exc:
        print(f"warning: no history ({path}: {exc.strerror})", file=sys.stderr)
        return None
    readline.set_history_length(HISTORY_LINES)

    def save():
        try:
            readline.write_history_file(path)
        except OSError as exc:
            print(f"warning: history not saved ({path}: {exc.strerror})", file=sys.stderr)

    atexit.register(save)
    return path


def load_session(args):
    import torch

    from nanochat.distributed import autodetect_device, compute_dtype
    from nanochat.engine import Engine
    from nanochat.model_io import find_chat_model, load_model
    from nanochat.tokenizer import Tokenizer

    checkpoint, tokenizer_dir, chat = find_chat_model(args.run, args.stage, args.checkpoint, args.runs_root)
    device = torch.device(args.device or autodetect_device())
    model, meta = load_model(checkpoint, device=device, compute_dtype=compute_dtype(device.type)[0])
    model.for_inference()
    tokenizer = Tokenizer.load(tokenizer_dir)
    print(f"loaded {meta['path']} (step {meta['step']}, {'chat' if chat else 'base'} model) on {device}",
          file=sys.stderr)
    return Engine(model, tokenizer), tokenizer, chat


def reply(engine, tokenizer, prompt_ids: list[int], args, out=sys.stdout) -> list[int]:
    """Stream one answer to `out` (Ctrl-C stops it); the generated ids."""
    text = ReplyText(tokenizer)
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    generated = []
    steps = engine.generate(prompt_ids, num_samples=1, max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed)
    try:
        for column, _ in steps:
            token = column[0]
            if token in stops:
                break
            generated.append(token)
            out.write(text.push(token))
            out.flush()
        out.write(text.finish())
    except KeyboardInterrupt:
        out.write(text.finish() + " [stopped]")
    finally:
        steps.close()
    out.write("\n")
    return generated


def chat_prompt(tokenizer, turns: list[tuple[str, list[int]]]) -> list[int]:
    """bos, then each (role, ids) turn in its special tokens, then <|assistant_start|> for the reply."""
    special = tokenizer.encode_special
    ids = [tokenizer.get_bos_token_id()]
    for role, content in turns:
        ids += [special(f"<|{role}_start|>"), *content, special(f"<|{role}_end|>")]
    return ids + [special("<|assistant_start|>")]


def hint(history: Path | None) -> str:
    kept = f"; history in {history}" if history else ""
    return f"Type 'clear' for a new conversation, 'quit' or Ctrl-D to leave, Ctrl-C to stop a reply{kept}."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat.chat_cli", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="")
    args = parser.parse_intermixed_args(argv)
    try:
        engine, tokenizer, chat = load_session(apply_words(args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.prompt is None:
        print(hint(start_history()), file=sys.stderr)
    turns: list[tuple[str, list[int]]] = []
    while True:
        if args.prompt is not None:
            text = args.prompt
        else:
            try:
                print()  # not in the prompt: readline redraws a prompt with a newline in it wrongly
                text = input("User: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if text in ("quit", "exit"):
                return 0
            if text == "clear":
                turns = []
                continue
            if not text:
                continue
        if chat:
            turns.append(("user", tokenizer.encode(text)))
            print("Assistant: ", end="", flush=True)
            turns.append(("assistant", reply(engine, tokenizer, chat_prompt(tokenizer, turns), args)))
        else:
            print(text, end="", flush=True)
            reply(engine, tokenizer, tokenizer.encode(text, prepend=tokenizer.get_bos_token_id()), args)
        if args.prompt is not None:
            return 0


if __name__ == "__main__":
    sys.exit(main())
