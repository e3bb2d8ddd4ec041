"""Chat with a trained model in the terminal (on a compute node: `srun --pty python -m nanochat.chat_cli`).

    python -m nanochat.chat_cli [--run RUN] [--stage base|sft|rl] [--checkpoint DIR] [-p PROMPT]

Without --run: the newest run; without --stage: rl, else sft, else base. A base model continues text; a chat
model (sft, rl) answers in turns, and its calculator tool calls are run by the engine. Type 'clear' to start a
new conversation, 'quit' or Ctrl-D to leave.
"""

import argparse
import sys

from nanochat.common import UserError


class StreamDecoder:
    """Decode a growing token list and return only the new text (a token may end mid UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def load_session(args):
    import torch

    from nanochat.distributed import autodetect_device, compute_dtype
    from nanochat.engine import Engine
    from nanochat.model_io import find_chat_model, load_model
    from nanochat.tokenizer import Tokenizer

    checkpoint, tokenizer_dir, chat = find_chat_model(args.run, args.stage, args.checkpoint)
    device = torch.device(args.device or autodetect_device())
    model, meta = load_model(checkpoint, device=device, compute_dtype=compute_dtype(device.type)[0])
    tokenizer = Tokenizer.load(tokenizer_dir)
    print(f"loaded {meta['path']} (step {meta['step']}, {'chat' if chat else 'base'} model) on {device}",
          file=sys.stderr)
    return Engine(model, tokenizer), tokenizer, chat


def reply(engine, tokenizer, prompt_ids: list[int], args, out=sys.stdout) -> list[int]:
    """Stream one answer to `out`; the generated ids."""
    decoder = StreamDecoder(tokenizer)
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    generated = []
    for column, _ in engine.generate(prompt_ids, num_samples=1, max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        token = column[0]
        if token in stops:
            break
        generated.append(token)
        out.write(decoder.push(token))
        out.flush()
    out.write("\n")
    return generated


def chat_prompt(tokenizer, turns: list[tuple[str, list[int]]]) -> list[int]:
    """bos, then each (role, ids) turn in its special tokens, then <|assistant_start|> for the reply."""
    special = tokenizer.encode_special
    ids = [tokenizer.get_bos_token_id()]
    for role, content in turns:
        ids += [special(f"<|{role}_start|>"), *content, special(f"<|{role}_end|>")]
    return ids + [special("<|assistant_start|>")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat.chat_cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run name or folder (default: the newest run)")
    parser.add_argument("--stage", choices=["base", "sft", "rl"], help="default: rl, else sft, else base")
    parser.add_argument("--checkpoint", help="a checkpoint folder (ours or upstream nanochat's)")
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="")
    args = parser.parse_args(argv)
    try:
        engine, tokenizer, chat = load_session(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    turns: list[tuple[str, list[int]]] = []
    while True:
        if args.prompt is not None:
            text = args.prompt
        else:
            try:
                text = input("\nUser: ").strip()
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
