"""Spelling and letter counting, generated on the fly, as upstream nanochat's tasks/spellingbee.py:

    SpellingBee     "How many r are in strawberry?" -> spell the word, count by hand, check with the calculator
                    ('strawberry'.count('r')), end with "#### 3" like GSM8K. Generative; scored on the number.
    SimpleSpelling  "Spell the word: apple" -> "apple:a,p,p,l,e", the hard part of the above on its own
                    (a token has to be mapped to its letters, which small models only learn when shown often).

Examples are a pure function of (seed, split, index): no storage, the same example every time. Train and test
never share a word: a word belongs to test when a hash of it is 0 mod TEST_EVERY, so a test score measures
spelling words the model never practised.

Word lists:
    source="fixture"  tasks/data/words.txt, shipped: ~3,000 common English words taken from the prose of the
                      embedded Python-docs corpus (PSF licence). Regenerate: python -m tasks.spellingbee --make-words
    source="hub"      dwyl/english-words' words_alpha.txt (370K words, what upstream uses), staged into
                      $NANOCHAT_BASE_DIR/tasks/ on a login node by `python -m tasks.stage`.

Preview: python -m tasks.spellingbee [--simple] [-n 5]
"""

import argparse
import hashlib
import random
import re
import string
from collections import Counter
from functools import lru_cache
from pathlib import Path

from nanochat.common import UserError, get_base_dir
from nanochat.registry import WORD_LIST
from tasks.common import Task
from tasks.gsm8k import extract_answer

DATA_DIR = Path(__file__).resolve().parent / "data"
WORDS_PATH = DATA_DIR / "words.txt"
TEST_EVERY = 10  # one word in 10 is held out for the test split
SPLITS = ("train", "test")
SOURCES = ("fixture", "hub")

# -----------------------------------------------------------------------------------------------------------
# The "#### N" answer, shared by the generated math-style tasks (tasks/arithmetic.py imports it): graded as GSM8K
# is, which is what upstream's SpellingBee did (the same pattern and normalisation)


def reference_answer(conversation: dict) -> str | None:
    """The answer in a conversation's last message (its last text part when the content is a list of parts)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, list):
        content = next((part["text"] for part in reversed(content) if part["type"] == "text"), "")
    return extract_answer(content)


def example_rng(*key) -> random.Random:
    """A generator seeded from the key's text through sha256: the same stream on every machine and run
    (Python's hash() of a str is salted per process, so it is not used)."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def is_test_key(key: str, every: int = TEST_EVERY) -> bool:
    """Whether a word (or any item key) belongs to the test split: a stable hash, 0 mod `every`."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % every == 0


# -----------------------------------------------------------------------------------------------------------
# Word lists


@lru_cache(maxsize=4)
def _read_words(path: str) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        words = (line.strip() for line in f)
        return tuple(w for w in words if w.isascii() and w.isalpha() and w.islower())


def load_words(source: str = "fixture", split: str | None = None) -> tuple[str, ...]:
    """The word list of a source, restricted to one split's words when `split` is given."""
    if source == "fixture":
        path = WORDS_PATH
        if not path.is_file():
            raise UserError(f"word list {path} is missing; regenerate it with: python -m tasks.spellingbee --make-words")
    elif source == "hub":
        path = get_base_dir() / WORD_LIST.dest  # upstream's word list, staged by tasks.stage
        if not path.is_file():
            raise UserError(f"SpellingBee word list {path} not staged: run `python -m tasks.stage`")
    else:
        raise UserError(f"unknown word source {source!r}; valid: {', '.join(SOURCES)}")
    return _read_words(str(path)) if split is None else _split_words(str(path), split)


@lru_cache(maxsize=8)
def _split_words(path: str, split: str) -> tuple[str, ...]:
    return tuple(w for w in _read_words(path) if is_test_key(w) == (split == "test"))


# Words of programming rather than English that pass the prose filter below
NOT_ENGLISH = set("""
awaitable bpo bytestring bzip callables char ctypes dev dicts docstring docstrings doctest doctests enum enums hee
howto inter int iterables mbox metaclass metaclasses multi ncurses non opcode param pax picklable pre pymalloc
regex stdin stdlib subparts syscall toplevel tty tut unpickled unpickling van von wasm zipfile
""".split())


def make_words(min_docs: int = 8, max_code_share: float = 0.5) -> list[str]:
    """The shipped word list, extracted from the embedded corpus (the Python 3.11 docs): lowercase alphabetic
    words of 3..12 letters that appear in the prose of at least `min_docs` documents and that are not mostly
    code (at most `max_code_share` of their occurrences next to . _ ( = quotes or backticks, which drops
    `self`, `args`, `dict`, ...), minus a short list of jargon. Deterministic: ~3,000 words."""
    from nanochat.corpus import load_documents

    inline_code = re.compile(r"`[^`]*`|\*[^*\s][^*]*\*|\S*[_./\\@$<>=#{}\[\]]\S*|\S+\(\S*")
    signature = re.compile(r"^\S+\(.*\)\s*$")
    word_re = re.compile(r"[A-Za-z]+")
    bare_word = re.compile(r"(?<![A-Za-z0-9])([a-z]{3,12})(?![A-Za-z0-9])")
    prose_docs, total, code = Counter(), Counter(), Counter()
    for doc in load_documents():
        seen = set()
        for line in doc.splitlines():
            # prose: unindented (code blocks are indented), not a >>> session, not a bare signature line
            if not line or line[0].isspace() or line.startswith(">>>") or signature.match(line):
                continue
            words = word_re.findall(inline_code.sub(" ", line))
            if len(words) >= 4:
                seen.update(w for w in words if w.islower() and 3 <= len(w) <= 12)
        prose_docs.update(seen)
        for m in bare_word.finditer(doc):
            total[m.group(1)] += 1
            before = doc[m.start() - 1] if m.start() else " "
            after = doc[m.end()] if m.end() < len(doc) else " "
            if before in "._(`[=*'\"" or after in "_(.=`*'\"[":
                code[m.group(1)] += 1
    return sorted(w for w, n in prose_docs.items()
                  if n >= min_docs and code[w] <= max_code_share * max(1, total[w]) and w not in NOT_ENGLISH)


# -----------------------------------------------------------------------------------------------------------
# SpellingBee

LETTERS = string.ascii_lowercase

# The question, in many phrasings (data augmentation); {letter} and {word} may get quotes around them.
QUESTION_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are there in {word}",
    "How many letter {letter} does the word {word} have",
    "How many times does {letter} appear in {word}",
    "How many times does the letter {letter} occur in {word}",
    "How often does {letter} show up in {word}",
    "How many {letter} does {word} contain",
    "Count the {letter} in {word}",
    "Count the letter {letter} in the word {word}",
    "Count how many times {letter} appears in {word}",
    "Please count the {letter}s in {word}",
    "Can you count the {letter} in {word} for me",
    "Could you tell me how many {letter} there are in {word}",
    "What is the number of {letter} in {word}",
    "What's the count of {letter} in {word}",
    "Tell me how many {letter} are in {word}",
    "In the word {word}, how many {letter} are there",
    "In {word}, how many times does {letter} appear",
    "{word}: how many {letter}",
    "Number of {letter} in {word}",
    "I need the number of {letter} in the word {word}",
    "Find the number of occurrences of {letter} in {word}",
    # a few other languages, as upstream has
    "¿Cuántas {letter} hay en {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie viele {letter} sind in {word}",
    "Quante {letter} ci sono in {word}",
]
QUOTES = ("", "'", '"')


def count_letter_solution(word: str, letter: str) -> list[dict]:
    """The assistant's answer as parts: spell, count by hand, check with the calculator, "#### n"."""
    count = word.count(letter)
    lines = [f"We need to count the letter '{letter}' in the word '{word}'. Let me first do it by hand.",
             "", "Spelled out:", f"{word}:{','.join(word)}", "", f"Going through the letters, counting '{letter}':"]
    running = 0
    for i, char in enumerate(word, 1):
        # no space between the position and the letter: " a" and "a" are different tokens, and the
        # spelled-out form above writes the letters without one
        if char == letter:
            running += 1
            lines.append(f"{i}:{char} hit! count={running}")
        else:
            lines.append(f"{i}:{char}")
    lines += ["", f"By hand I get {running}.", "", "Let me check this with Python:", "", ""]
    return [
        {"type": "text", "text": "\n".join(lines)},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives {count} as well.\n\nMy final answer is:\n\n#### {count}"},
    ]


class _WordTask(Task):
    """Shared by the two spelling tasks: validated arguments and the split's word list."""

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, source: str = "fixture", **slicing):
        super().__init__(**slicing)
        if split not in SPLITS:
            raise UserError(f"{type(self).__name__}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if size < 0:
            raise UserError(f"{type(self).__name__}: size must be >= 0, got {size}")
        self.size, self.split, self.seed, self.source = size, split, seed, source
        self.words = load_words(source, split)
        if not self.words:
            raise UserError(f"{type(self).__name__}: the {source} word list has no {split} words")

    def num_examples(self) -> int:
        return self.size


class SpellingBee(_WordTask):
    """How many times a letter occurs in a word; the answer ends with "#### n". Generative, baseline 0."""

    name = "SpellingBee"
    eval_type = "generative"
    baseline = 0.0

    def get_example(self, index: int) -> dict:
        rng = example_rng("spellingbee", self.seed, self.split, index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes any letter, so that 0 is an answer too
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        template = rng.choice(QUESTION_TEMPLATES)
        if rng.random() < 0.3:  # people who do not bother with the shift key
            template = template.lower()
        letter_q, word_q = rng.choice(QUOTES), rng.choice(QUOTES)
        question = template.format(letter=f"{letter_q}{letter}{letter_q}", word=f"{word_q}{word}{word_q}")
        if rng.random() < 0.5:
            question += "?"
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": count_letter_solution(word, letter)}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        predicted = extract_answer(completion)
        return predicted is not None and predicted == reference_answer(conversation)


SPELL_TEMPLATES = ["Spell the word: {word}", "Spell the word {word}", "Spell {word}", "How do you spell {word}?",
                   "Spell out {word} letter by letter", "spell {word}"]


class SimpleSpelling(_WordTask):
    """Spell a word letter by letter: "apple:a,p,p,l,e". Generative; correct when the completion is exactly
    the reference."""

    name = "SimpleSpelling"
    eval_type = "generative"
    baseline = 0.0

    def get_example(self, index: int) -> dict:
        rng = example_rng("simplespelling", self.seed, self.split, index)
        word = rng.choice(self.words)
        question = rng.choice(SPELL_TEMPLATES).format(word=word)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


# -----------------------------------------------------------------------------------------------------------


def _show(conversation: dict) -> str:
    out = []
    for message in conversation["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(p["text"] if p["type"] == "text" else
                              f"<<{p['text']}" if p["type"] == "python" else f"={p['text']}>>" for p in content)
        out.append(f"[{message['role']}] {content}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.spellingbee", description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-words", action="store_true", help=f"regenerate {WORDS_PATH.relative_to(DATA_DIR.parent.parent)}")
    parser.add_argument("--simple", action="store_true", help="preview SimpleSpelling instead")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("-n", type=int, default=5, help="how many examples to preview")
    args = parser.parse_args(argv)
    if args.make_words:
        words = make_words()
        WORDS_PATH.parent.mkdir(parents=True, exist_ok=True)
        WORDS_PATH.write_text("\n".join(words) + "\n", encoding="utf-8")
        print(f"wrote {len(words)} words to {WORDS_PATH}")
        return 0
    task = (SimpleSpelling if args.simple else SpellingBee)(size=args.n, split=args.split)
    for conversation in task:
        print("=" * 80)
        print(_show(conversation))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
