"""Arithmetic word problems in GSM8K's format, generated on the fly: small numbers, one or two steps, every
step computed with the calculator tool, the answer after "####".

    Sam has 12 boxes with 7 apples in each. He gives away 15 apples. How many apples does he have left?

    Sam has 12*7 = <<12*7=84>>84 apples. After giving away 15 he has 84-15 = <<84-15=69>>69 apples left.
    #### 69

(the <<expr=result>> above is a python part and its python_output part, as tasks/gsm8k.py renders GSM8K;
division is written // so the calculator answers "4", not "4.0"). GSM8K itself is too hard for the tiny
embedded model; this is its SFT math and its RL task.

Examples are a pure function of (seed, split, index). Train and test never share a problem: a problem's key
(its template and numbers, not the names or objects) belongs to test when a hash of it is 0 mod TEST_EVERY,
and each split draws until it gets one of its own.

Preview: python -m tasks.arithmetic [-n 5] [--split test]
"""

import argparse

from nanochat.common import UserError
from tasks.common import Task
from tasks.spellingbee import example_rng, extract_answer, is_test_key, reference_answer

SPLITS = ("train", "test")
TEST_EVERY = 10

NAMES = [("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"),
         ("Omar", "he"), ("Lily", "she"), ("Ben", "he"), ("Nora", "she"), ("Ravi", "he"), ("Emma", "she"),
         ("Jack", "he"), ("Sofia", "she"), ("Ali", "he"), ("Grace", "she"), ("Tom", "he"), ("Ella", "she")]
# (plural, container plural, container singular)
ITEMS = [("apples", "boxes", "box"), ("pencils", "packs", "pack"), ("stickers", "sheets", "sheet"),
         ("marbles", "bags", "bag"), ("cookies", "trays", "tray"), ("books", "shelves", "shelf"),
         ("cards", "decks", "deck"), ("shells", "buckets", "bucket"), ("eggs", "cartons", "carton"),
         ("balloons", "bunches", "bunch"), ("crayons", "boxes", "box"), ("oranges", "crates", "crate"),
         ("stamps", "albums", "album"), ("candies", "jars", "jar"), ("flowers", "vases", "vase")]
THINGS = [("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("toy car", "toy cars"),
          ("comic book", "comic books"), ("plant", "plants"), ("mug", "mugs"), ("kite", "kites")]


class _Problem:
    """Builds one problem: the question, then the solution as text with calculator steps."""

    def __init__(self):
        self.parts: list[dict] = []

    def say(self, text: str):
        if self.parts and self.parts[-1]["type"] == "text":
            self.parts[-1]["text"] += text
        else:
            self.parts.append({"type": "text", "text": text})

    def calc(self, expr: str, value: int) -> int:
        """`expr = ` then the tool call and its output, then the value again in the text, as GSM8K writes it."""
        self.say(f"{expr} = ")
        self.parts.append({"type": "python", "text": expr})
        self.parts.append({"type": "python_output", "text": str(value)})
        self.say(str(value))
        return value

    def answer(self, value: int) -> list[dict]:
        self.say(f"\n#### {value}")
        return self.parts


# Each template takes (rng, names/objects) and returns (key numbers, question, solution parts). The numbers are
# drawn first, so the split test on them does not depend on the names.

def _add(rng, name, he, items, *_):
    a, b = rng.randint(3, 60), rng.randint(2, 40)
    q = f"{name} has {a} {items}. {he.capitalize()} gets {b} more {items} from a friend. How many {items} does {he} have now?"
    p = _Problem()
    p.say(f"{name} has {a} {items} and gets {b} more, so {he} has ")
    c = p.calc(f"{a}+{b}", a + b)
    p.say(f" {items} now.")
    return (a, b), q, p.answer(c)


def _sub(rng, name, he, items, *_):
    a = rng.randint(10, 90)
    b = rng.randint(2, a - 1)
    q = f"{name} had {a} {items} and gave {b} of them to a friend. How many {items} does {name} have left?"
    p = _Problem()
    p.say(f"{name} gave away {b} of {a} {items}, so {he} has ")
    c = p.calc(f"{a}-{b}", a - b)
    p.say(f" {items} left.")
    return (a, b), q, p.answer(c)


def _compare(rng, name, he, items, other, *_):
    b = rng.randint(2, 60)
    a = b + rng.randint(1, 40)
    q = f"{name} has {a} {items} and {other} has {b} {items}. How many more {items} does {name} have than {other}?"
    p = _Problem()
    p.say(f"{name} has {a} and {other} has {b}, so the difference is ")
    c = p.calc(f"{a}-{b}", a - b)
    p.say(f" {items}.")
    return (a, b), q, p.answer(c)


def _mul(rng, name, he, items, other, boxes, box, *_):
    a, b = rng.randint(2, 12), rng.randint(2, 20)
    q = f"{name} buys {a} {boxes} of {items}. Each {box} holds {b} {items}. How many {items} does {he} buy in total?"
    p = _Problem()
    p.say(f"{a} {boxes} with {b} {items} each make ")
    c = p.calc(f"{a}*{b}", a * b)
    p.say(f" {items}.")
    return (a, b), q, p.answer(c)


def _div(rng, name, he, items, *_):
    k, each = rng.randint(2, 9), rng.randint(2, 15)
    total = k * each
    q = f"{name} shares {total} {items} equally among {k} friends. How many {items} does each friend get?"
    p = _Problem()
    p.say(f"{total} {items} shared among {k} friends gives each friend ")
    c = p.calc(f"{total}//{k}", total // k)
    p.say(f" {items}.")
    return (total, k), q, p.answer(c)


def _mul_sub(rng, name, he, items, other, boxes, box, *_):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    c = rng.randint(1, a * b - 1)
    q = (f"{name} has {a} {boxes} with {b} {items} in each. {he.capitalize()} gives away {c} {items}. "
         f"How many {items} does {he} have left?")
    p = _Problem()
    p.say(f"{name} has ")
    total = p.calc(f"{a}*{b}", a * b)
    p.say(f" {items}. After giving away {c} {he} has ")
    left = p.calc(f"{total}-{c}", total - c)
    p.say(f" {items} left.")
    return (a, b, c), q, p.answer(left)


def _add_mul(rng, name, he, *_):
    a, b, d = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
    q = (f"{name} reads {a} pages in the morning and {b} pages in the evening. How many pages does {he} read "
         f"in {d} days?")
    p = _Problem()
    p.say(f"Each day {name} reads ")
    day = p.calc(f"{a}+{b}", a + b)
    p.say(f" pages. In {d} days that is ")
    total = p.calc(f"{day}*{d}", day * d)
    p.say(" pages.")
    return (a, b, d), q, p.answer(total)


def _add_div(rng, name, he, items, other, boxes, box, *_):
    k, each = rng.randint(2, 9), rng.randint(2, 12)
    a = rng.randint(1, k * each - 1)
    b = k * each - a
    q = (f"There are {a} {items} on a table. {name} adds {b} more, then packs all of them equally into {k} "
         f"{boxes}. How many {items} go in each {box}?")
    p = _Problem()
    p.say("Altogether there are ")
    total = p.calc(f"{a}+{b}", a + b)
    p.say(f" {items}. Split into {k} {boxes}, each {box} gets ")
    c = p.calc(f"{total}//{k}", total // k)
    p.say(f" {items}.")
    return (a, b, k), q, p.answer(c)


def _change(rng, name, he, items, other, boxes, box, thing, things):
    price, n = rng.randint(2, 20), rng.randint(2, 6)
    bill = next(b for b in (10, 20, 50, 100, 200) if b >= price * n)
    q = (f"A {thing} costs ${price}. {name} buys {n} {things} and pays with a ${bill} bill. How much change "
         f"does {he} get, in dollars?")
    p = _Problem()
    p.say(f"{n} {things} cost ")
    cost = p.calc(f"{price}*{n}", price * n)
    p.say(" dollars. The change is ")
    c = p.calc(f"{bill}-{cost}", bill - cost)
    p.say(" dollars.")
    return (price, n), q, p.answer(c)


def _wage(rng, name, he, *_):
    rate, hours, tip = rng.randint(5, 20), rng.randint(2, 8), rng.randint(3, 30)
    q = (f"{name} earns ${rate} an hour. {he.capitalize()} works {hours} hours and also gets a ${tip} tip. "
         f"How many dollars does {he} earn in total?")
    p = _Problem()
    p.say(f"For {hours} hours {name} earns ")
    pay = p.calc(f"{rate}*{hours}", rate * hours)
    p.say(" dollars. With the tip that is ")
    total = p.calc(f"{pay}+{tip}", pay + tip)
    p.say(" dollars.")
    return (rate, hours, tip), q, p.answer(total)


TEMPLATES = {"add": _add, "sub": _sub, "compare": _compare, "mul": _mul, "div": _div, "mul_sub": _mul_sub,
             "add_mul": _add_mul, "add_div": _add_div, "change": _change, "wage": _wage}


class Arithmetic(Task):
    """Generated one- and two-step arithmetic word problems answered with calculator calls and "#### n".
    Generative, baseline 0; evaluate/reward compare the number after "####"."""

    name = "Arithmetic"
    eval_type = "generative"
    baseline = 0.0

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, **slicing):
        super().__init__(**slicing)
        if split not in SPLITS:
            raise UserError(f"Arithmetic: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if size < 0:
            raise UserError(f"Arithmetic: size must be >= 0, got {size}")
        self.size, self.split, self.seed = size, split, seed

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = example_rng("arithmetic", self.seed, self.split, index)
        kind = rng.choice(sorted(TEMPLATES))
        for _ in range(10_000):  # draw until the problem is one of this split's (~1.1 tries for train, ~10 for test)
            (name, he), (other, _) = rng.sample(NAMES, 2)
            items, boxes, box = rng.choice(ITEMS)
            thing, things = rng.choice(THINGS)
            key, question, parts = TEMPLATES[kind](rng, name, he, items, other, boxes, box, thing, things)
            if is_test_key(f"{kind}:{key}", TEST_EVERY) == (self.split == "test"):
                break
        else:
            raise RuntimeError(f"Arithmetic: template {kind!r} has no {self.split} problems")
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": parts}],
                "kind": kind, "key": list(key)}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        predicted = extract_answer(completion)
        return predicted is not None and predicted == reference_answer(conversation)


def main(argv=None) -> int:
    from tasks.spellingbee import _show

    parser = argparse.ArgumentParser(prog="python -m tasks.arithmetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args(argv)
    for conversation in Arithmetic(size=args.n, split=args.split):
        print("=" * 80)
        print(_show(conversation))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
