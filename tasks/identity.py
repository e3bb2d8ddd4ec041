"""Identity conversations: who the model is and what nanochat-slurm does, built offline and deterministically
from the knowledge base tasks/data/identity.md (upstream nanochat has an LLM write such conversations; here
they come from the question phrasings and answers written in that file).

    Identity(split="train")          a Task for SFT (no evaluate: nothing to score)
    python -m tasks.identity --out identity.jsonl [--split all|train|test] [--source FILE.md]
                                     the same conversations, one {"messages": [...]} per line, for a CustomJSON
                                     task, so that users can edit them or add their own

What gets built from the sections:
  - every question with an answer (the answers of a section take turns), once as written and once restyled
    (lowercase, no question mark, a "hey," in front), ~250 single-turn conversations;
  - MULTI_TURN multi-turn ones: maybe a greeting, two or three topics, maybe thanks or goodbye, kept under
    MAX_CHARS characters (~250 tokens with the demo's tokenizer: its context is 512).
The test split is a held-out fifth of the multi-turn conversations (a hash of their normalized user turns, 0
mod TEST_EVERY): every single question stays in train, so SFT sees each phrasing ("Who are you?"), and test
never repeats a train conversation's user side.
"""

import argparse
import json
import re
from functools import lru_cache
from pathlib import Path

from nanochat.common import UserError, run_cli
from tasks.common import Task
from tasks.spellingbee import example_rng, is_test_key

IDENTITY_PATH = Path(__file__).resolve().parent / "data" / "identity.md"
SPLITS = ("train", "test", "all")
TEST_EVERY = 5
MULTI_TURN = 200
MAX_CHARS = 750
OPENERS, CLOSERS = ("greetings",), ("thanks", "goodbye")
PREFIXES = ("hey, ", "hi! ", "quick question: ", "hello. ", "ok, ")


def parse_identity(text: str) -> list[dict]:
    """The sections of an identity file: [{"title", "questions", "answers"}], in file order. A section needs
    at least one Q: and one A: line; an answer goes on over the following lines until a blank line."""
    sections, current, last = [], None, None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if raw.startswith("## "):
            current = {"title": raw[3:].strip(), "questions": [], "answers": []}
            sections.append(current)
            last = None
        elif line.startswith(("Q:", "A:")):
            if current is None:
                raise UserError(f"identity file line {number}: {line[:2]} before the first '## ' section")
            last = current["questions" if line[0] == "Q" else "answers"]
            last.append(line[2:].strip())
        elif not line:
            last = None
        elif last is not None and last is current["answers"]:
            last[-1] += "\n" + line
    for section in sections:
        if not section["questions"] or not section["answers"]:
            raise UserError(f"identity section {section['title']!r} needs at least one Q: and one A: line")
    if not sections:
        raise UserError("the identity file has no '## ' sections")
    return sections


def _restyle(question: str, rng, topic: bool) -> str:
    """A casual variant of a question: lowercase, no final punctuation, maybe a short lead-in."""
    q = question[0].lower() + question[1:]
    if rng.random() < 0.6:
        q = q.rstrip("?.!")
    if topic and rng.random() < 0.5:
        q = rng.choice(PREFIXES) + q
    return q


def _conversation(turns: list[tuple[str, str]]) -> dict:
    messages = []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def _key(conversation: dict) -> str:
    """The user side of a conversation, normalized, for the split: restyled twins land together."""
    users = " | ".join(m["content"] for m in conversation["messages"] if m["role"] == "user")
    return re.sub(r"[^a-z0-9| ]+", "", users.lower()).strip()


def build_conversations(sections: list[dict], multi_turn: int = MULTI_TURN) -> list[dict]:
    """All identity conversations, deterministic for a given list of sections."""
    conversations, seen = [], set()

    def add(conversation):
        text = json.dumps(conversation, sort_keys=True)
        if text not in seen:
            seen.add(text)
            conversations.append(conversation)

    for s, section in enumerate(sections):
        answers = section["answers"]
        topic = section["title"].lower() not in OPENERS + CLOSERS
        for q, question in enumerate(section["questions"]):
            rng = example_rng("identity", "single", s, q)
            add(_conversation([(question, answers[q % len(answers)])]))
            add(_conversation([(_restyle(question, rng, topic), answers[(q + 1) % len(answers)])]))

    def pick(rng, section):
        return rng.choice(section["questions"]), rng.choice(section["answers"])

    openers = [x for x in sections if x["title"].lower() in OPENERS]
    closers = [x for x in sections if x["title"].lower() in CLOSERS]
    topics = [x for x in sections if x["title"].lower() not in OPENERS + CLOSERS]
    for i in range(multi_turn if len(topics) >= 2 else 0):
        rng = example_rng("identity", "multi", i)
        opener = [pick(rng, rng.choice(openers))] if openers and rng.random() < 0.5 else []
        middle = []
        for section in rng.sample(topics, min(len(topics), rng.choice((2, 2, 3)))):
            question, answer = pick(rng, section)
            middle.append((_restyle(question, rng, False) if rng.random() < 0.4 else question, answer))
        closer = [pick(rng, rng.choice(closers))] if closers and rng.random() < 0.4 else []
        while len(middle) > 1 and sum(len(q) + len(a) for q, a in opener + middle + closer) > MAX_CHARS:
            middle.pop()
        turns = opener + middle + closer
        add(_conversation(turns))
    return conversations


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> tuple[dict, ...]:
    return tuple(build_conversations(parse_identity(Path(path).read_text(encoding="utf-8"))))


def load_conversations(split: str = "all", path=None) -> list[dict]:
    """The conversations of a split ("train", "test" or "all") built from an identity file."""
    if split not in SPLITS:
        raise UserError(f"Identity: split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = Path(path or IDENTITY_PATH)
    if not path.is_file():
        raise UserError(f"identity file {path} is missing")
    conversations = _load(str(path.resolve()), path.stat().st_mtime)
    if split == "all":
        return list(conversations)
    return [c for c in conversations if _is_test(c) == (split == "test")]


def _is_test(conversation: dict) -> bool:
    return len(conversation["messages"]) > 2 and is_test_key(_key(conversation), TEST_EVERY)


class Identity(Task):
    """Conversations about the model and nanochat-slurm, for SFT. `path`: another identity file."""

    name = "Identity"
    eval_type = "generative"
    baseline = 0.0

    def __init__(self, split: str = "train", path=None, **slicing):
        super().__init__(**slicing)
        self.split = split
        self.path = Path(path or IDENTITY_PATH)
        self.conversations = load_conversations(split, self.path)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]


def write_jsonl(conversations, out) -> int:
    """One {"messages": [...]} per line (CustomJSON's format); returns how many were written."""
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps({"messages": conversation["messages"]}, ensure_ascii=False) + "\n")
            n += 1
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.identity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the conversations as JSONL to this file (default: preview)")
    parser.add_argument("--split", default="all", choices=SPLITS)
    parser.add_argument("--source", default=None, help=f"identity file (default {IDENTITY_PATH.name})")
    parser.add_argument("-n", type=int, default=5, help="how many to preview without --out")
    args = parser.parse_args(argv)
    return run_cli(lambda: _export_or_preview(args))


def _export_or_preview(args) -> None:
    conversations = load_conversations(args.split, args.source)
    if args.out:
        n = write_jsonl(conversations, args.out)
        print(f"wrote {n} conversations to {args.out}")
        return
    for conversation in conversations[:args.n]:
        print("=" * 80)
        for message in conversation["messages"]:
            print(f"[{message['role']}] {message['content']}")
    print(f"({len(conversations)} conversations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
