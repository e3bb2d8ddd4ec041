"""The generated tasks (tasks/spellingbee.py, tasks/arithmetic.py, tasks/identity.py): deterministic, train and
test disjoint, every conversation renders and its tool calls give the outputs it states with the engine's real
calculator, evaluation accepts the reference and rejects a wrong answer; the shipped word list; identity.md
coverage and the JSONL export; the hub word list's staging error."""

import json
import re

import pytest

from nanochat.common import UserError, get_base_dir
from nanochat.engine import use_calculator
from tasks.arithmetic import TEMPLATES, Arithmetic
from tasks.identity import (IDENTITY_PATH, Identity, build_conversations, load_conversations,
                            parse_identity, write_jsonl)
from tasks.identity import main as identity_main
from tasks.spellingbee import (NOT_ENGLISH, WORDS_PATH, SimpleSpelling, SpellingBee, extract_answer, load_words,
                               make_words)

N = 300  # examples checked per generated task


def assistant_text(conversation) -> str:
    """The assistant's last message as the model would write it: text and tool calls, tool outputs included."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def tool_calls(conversation):
    """(expression, stated output) for every python part."""
    calls = []
    for message in conversation["messages"]:
        parts = message["content"] if isinstance(message["content"], list) else []
        for part, following in zip(parts, parts[1:] + [None]):
            if part["type"] == "python":
                assert following is not None and following["type"] == "python_output", "a call without output"
                calls.append((part["text"], following["text"]))
    return calls


def word_of(conversation) -> str:
    expr = tool_calls(conversation)[0][0]
    return re.fullmatch(r"'([a-z]+)'\.count\('[a-z]'\)", expr).group(1)


def generated_tasks():
    return [SpellingBee(size=N), SpellingBee(size=N, split="test"), SimpleSpelling(size=N),
            SimpleSpelling(size=N, split="test"), Arithmetic(size=N), Arithmetic(size=N, split="test")]


# -- determinism, sizes, splits -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [SpellingBee, SimpleSpelling, Arithmetic])
def test_same_index_same_example_and_seed_changes_it(make):
    a, b = make(size=50, seed=3), make(size=50, seed=3)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert len({json.dumps(a[i]) for i in range(50)}) > 40  # not one example repeated
    other = make(size=50, seed=4)
    assert sum(a[i] != other[i] for i in range(50)) > 40
    assert make(size=50, seed=3, start=10, step=5)[2] == a[20]


@pytest.mark.parametrize("make", [SpellingBee, SimpleSpelling, Arithmetic])
def test_size_slicing_and_bad_arguments(make):
    task = make(size=37)
    assert len(task) == 37 and len(list(task)) == 37  # iteration must not stop early (a StopIteration inside)
    assert len(make(size=37, start=30)) == 7
    with pytest.raises(IndexError):
        task[37]
    with pytest.raises(UserError, match="split"):
        make(size=5, split="validation")
    with pytest.raises(UserError, match="size"):
        make(size=-1)


def test_spelling_train_and_test_words_are_disjoint():
    train, test = load_words("fixture", "train"), load_words("fixture", "test")
    assert not set(train) & set(test) and set(train) | set(test) == set(load_words("fixture"))
    assert 0.05 < len(test) / len(load_words("fixture")) < 0.15
    bee_train = {word_of(c) for c in SpellingBee(size=N)}
    bee_test = {word_of(c) for c in SpellingBee(size=N, split="test")}
    assert bee_train <= set(train) and bee_test <= set(test) and len(bee_test) > 100
    spell = {split: {c["messages"][-1]["content"].split(":")[0] for c in SimpleSpelling(size=N, split=split)}
             for split in ("train", "test")}
    assert not spell["train"] & spell["test"] and spell["test"] <= set(test)


def test_arithmetic_train_and_test_problems_are_disjoint():
    def problems(split):
        return {(c["kind"], tuple(c["key"])) for c in Arithmetic(size=1000, split=split)}

    train, test = problems("train"), problems("test")
    assert not train & test
    assert {kind for kind, _ in test} == set(TEMPLATES) == {kind for kind, _ in train}
    questions = {split: {c["messages"][0]["content"] for c in Arithmetic(size=1000, split=split)}
                 for split in ("train", "test")}
    assert not questions["train"] & questions["test"]


# -- rendering, tool calls, answers -------------------------------------------------------------------------


def test_every_conversation_renders_and_its_tool_calls_give_the_stated_outputs(small_tokenizer):
    python_start = small_tokenizer.encode_special("<|python_start|>")
    for task in generated_tasks():
        for conversation in task:
            ids, mask = small_tokenizer.render_conversation(conversation, max_tokens=1 << 30)
            assert len(ids) == len(mask) and sum(mask) > 0
            calls = tool_calls(conversation)
            for expr, output in calls:
                assert use_calculator(expr) == output, (task.name, expr, output)
            assert ids.count(python_start) == len(calls)
            if task.name in ("SpellingBee", "Arithmetic"):
                assert calls, task.name
                # the final answer is the last tool output, and it is right
                assert extract_answer(assistant_text(conversation)) == calls[-1][1]


def test_spellingbee_counts_are_right_and_include_zero():
    counts = []
    for conversation in SpellingBee(size=N):
        (expr, output), = tool_calls(conversation)
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", expr).groups()
        assert int(output) == word.count(letter)
        text = assistant_text(conversation)
        assert f"{word}:{','.join(word)}" in text  # spelled out
        assert text.count(" hit! count=") == word.count(letter)
        assert conversation["messages"][0]["content"]  # a question
        counts.append(int(output))
    assert 0 in counts and max(counts) >= 2


def test_simple_spelling_answers():
    for conversation in SimpleSpelling(size=50):
        word, letters = conversation["messages"][-1]["content"].split(":")
        assert letters.split(",") == list(word) and word in conversation["messages"][0]["content"]


@pytest.mark.parametrize("make", [SpellingBee, Arithmetic])
def test_evaluate_accepts_the_reference_and_rejects_a_wrong_answer(make):
    task = make(size=40, split="test")
    for conversation in task:
        reference = assistant_text(conversation)
        answer = extract_answer(reference)
        assert answer is not None
        assert task.evaluate(conversation, reference) is True and task.reward(conversation, reference) == 1.0
        assert not task.evaluate(conversation, f"I think it is\n#### {answer}.")  # graded as GSM8K: no final period
        assert not task.evaluate(conversation, f"####{answer}")  # nor a missing space
        assert not task.evaluate(conversation, reference.replace(f"#### {answer}", f"#### {int(answer) + 1}"))
        assert not task.evaluate(conversation, "no idea") and task.reward(conversation, "no idea") == 0.0
    assert task.eval_type == "generative" and task.baseline == 0


def test_simple_spelling_evaluate():
    task = SimpleSpelling(size=5)
    conversation = task[0]
    reference = conversation["messages"][-1]["content"]
    assert task.evaluate(conversation, reference + "\n") and not task.evaluate(conversation, reference + ",x")


def test_extract_answer():
    assert extract_answer("so 3+4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,000.") == "1000."  # upstream's SpellingBee kept the period (and so is wrong)
    assert extract_answer("####7") is None
    assert extract_answer("#### -12") == "-12"
    assert extract_answer("#### 2.5") == "2.5"
    assert extract_answer("the answer is 7") is None and extract_answer("") is None


# -- word lists -----------------------------------------------------------------------------------------------


def test_shipped_word_list_is_clean_sizeable_and_regenerates():
    lines = WORDS_PATH.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 2000 and len(set(lines)) == len(lines) and lines == sorted(lines)
    assert all(re.fullmatch(r"[a-z]{3,12}", w) for w in lines)
    assert {"function", "value", "because", "letter", "number"} <= set(lines)
    assert not {"self", "args", "def", "kwargs", "str"} & set(lines) and not NOT_ENGLISH & set(lines)
    assert make_words() == lines  # `python -m tasks.spellingbee --make-words` reproduces the file


def test_hub_word_list_missing_is_a_one_line_user_error():
    with pytest.raises(UserError) as info:
        SpellingBee(source="hub")
    message = str(info.value)
    assert "\n" not in message and "not staged" in message and "python -m tasks.stage" in message
    with pytest.raises(UserError, match="unknown word source"):
        SpellingBee(source="web")


def test_hub_word_list_when_staged():
    path = get_base_dir() / "tasks" / "words_alpha.txt"
    path.parent.mkdir(parents=True)
    words = [f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)}" for i in range(2000)]
    path.write_bytes(("\r\n".join(words + ["Capital", "x-ray", ""])).encode())  # dwyl's file has CRLF lines
    task = SpellingBee(size=50, source="hub")
    assert set(task.words) < set(words) and {word_of(c) for c in task} <= set(task.words)
    assert not set(SpellingBee(size=5, source="hub", split="test").words) & set(task.words)


# -- identity -----------------------------------------------------------------------------------------------


def test_identity_conversations_alternate_and_stay_short(small_tokenizer):
    conversations = load_conversations("all")
    assert 250 <= len(conversations) <= 600
    assert len({json.dumps(c, sort_keys=True) for c in conversations}) == len(conversations)
    assert sum(len(c["messages"]) > 2 for c in conversations) >= 100  # multi-turn ones
    for conversation in conversations:
        messages = conversation["messages"]
        assert len(messages) % 2 == 0
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
        # 750 characters measured ~300 tokens at most with the embedded run's tokenizer (vocab 8192)
        assert sum(len(m["content"]) for m in messages) <= 760
        small_tokenizer.render_conversation(conversation)
    assert load_conversations("all") == conversations  # deterministic


def test_identity_covers_every_section_and_splits_disjoint():
    sections = parse_identity(IDENTITY_PATH.read_text(encoding="utf-8"))
    assert len(sections) >= 15
    train, test = Identity(split="train"), Identity(split="test")
    assert len(train) + len(test) == len(load_conversations("all")) and len(test) >= 10
    answers = {m["content"] for c in train for m in c["messages"] if m["role"] == "assistant"}
    single = {c["messages"][0]["content"] for c in train if len(c["messages"]) == 2}
    for section in sections:
        assert set(section["answers"]) <= answers, section["title"]
        assert set(section["questions"]) <= single, section["title"]  # SFT sees every phrasing as written
    assert all(len(c["messages"]) > 2 for c in test)
    users = {split: {" | ".join(m["content"].lower() for m in c["messages"] if m["role"] == "user") for c in task}
             for split, task in (("train", train), ("test", test))}
    assert not users["train"] & users["test"]
    greetings = [c for c in train if c["messages"][0]["content"] in ("hi", "hello")]
    assert greetings and all("nanochat" in c["messages"][1]["content"] for c in greetings)
    names = [c for c in train if c["messages"][0]["content"] in ("Who are you?", "What's your name?")]
    assert names and all(c["messages"][1]["content"].startswith(("I'm nanochat", "My name is nanochat"))
                         for c in names)


def test_identity_facts_name_the_real_commands():
    text = IDENTITY_PATH.read_text(encoding="utf-8")
    for command in ("python -m experiments.launch +cluster=h100 depth=24", "sbatch slurm/speedrun.slurm",
                    "python -m nanochat.chat_web", "sbatch slurm/chat.slurm", "ssh -N -L",
                    "python -m experiments.status", "python -m nanochat.dataset -n 170"):
        assert command in text, command


def test_identity_jsonl_export_round_trips(tmp_path, capsys):
    out = tmp_path / "identity.jsonl"
    assert identity_main(["--out", str(out), "--split", "train"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"messages": c["messages"]} for c in Identity(split="train")]
    customjson = pytest.importorskip("tasks.customjson")  # what users load the exported file with
    assert list(customjson.CustomJSON(out)) == list(Identity(split="train"))
    assert write_jsonl(load_conversations("all"), tmp_path / "all.jsonl") == len(load_conversations("all"))
    assert identity_main(["--source", str(tmp_path / "nope.md")]) == 2
    assert "missing" in capsys.readouterr().err


def test_identity_from_an_edited_file(tmp_path):
    path = tmp_path / "mine.md"
    path.write_text("# mine\n\n## Greetings\nQ: hi\nA: Hello!\n\n## Name\nQ: Who are you?\nA: I'm Bob,\n"
                    "a model.\n\n## Job\nQ: What do you do?\nA: I help.\n", encoding="utf-8")
    sections = parse_identity(path.read_text())
    assert [s["title"] for s in sections] == ["Greetings", "Name", "Job"]
    assert sections[1]["answers"] == ["I'm Bob,\na model."]  # an answer goes on until a blank line
    task = Identity(split="all", path=path)
    assert {"messages": [{"role": "user", "content": "Who are you?"},
                         {"role": "assistant", "content": "I'm Bob,\na model."}]} in list(task)
    assert any(len(c["messages"]) >= 4 for c in build_conversations(sections))
    with pytest.raises(UserError, match="Q: and one A:"):
        parse_identity("## Empty\nQ: anything?\n")
    with pytest.raises(UserError, match="split"):
        Identity(split="dev")
