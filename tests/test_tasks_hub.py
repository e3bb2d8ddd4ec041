"""tasks/ over the hub datasets (ARC, MMLU, GSM8K, HumanEval, SmolTalk, CustomJSON): the handmade fixtures, the
hub cache and its staging (against a local HTTP server), scoring, and the conversation format."""

import hashlib
import json
import re
from dataclasses import replace
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.download import NoNetworkError
from nanochat.registry import WORD_LIST
from tasks import download as download_mod
from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, extract_answer, solution_parts
from tasks.hub import DATA, FIXTURE_DIR
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from test_download import closed_port_url, server  # noqa: F401 (fixture); tests/ is on sys.path under pytest
from test_hub import hub  # noqa: F401 (fixture)

FIXTURE_TASKS = {
    "arc-easy-test": lambda **kw: ARC("ARC-Easy", "test", **kw),
    "arc-easy-train": lambda **kw: ARC("ARC-Easy", "train", **kw),
    "arc-challenge-test": lambda **kw: ARC("ARC-Challenge", "test", **kw),
    "arc-challenge-train": lambda **kw: ARC("ARC-Challenge", "train", **kw),
    "mmlu-test": lambda **kw: MMLU("all", "test", **kw),
    "mmlu-aux": lambda **kw: MMLU("auxiliary_train", "train", **kw),
    "gsm8k-train": lambda **kw: GSM8K("main", "train", **kw),
    "gsm8k-test": lambda **kw: GSM8K("main", "test", **kw),
    "humaneval": lambda **kw: HumanEval(**kw),
    "smoltalk-train": lambda **kw: SmolTalk("train", **kw),
    "smoltalk-test": lambda **kw: SmolTalk("test", **kw),
}
CATEGORICAL = ["arc-easy-test", "arc-easy-train", "arc-challenge-test", "arc-challenge-train", "mmlu-test",
               "mmlu-aux"]


# ----------------------------------------------------------------------------------------------------------
# Fixtures: load, render, slice, order


@pytest.mark.parametrize("key", FIXTURE_TASKS)
def test_every_fixture_conversation_renders(key, small_tokenizer):
    task = FIXTURE_TASKS[key](source="fixture")
    assert 4 <= len(task) <= 30
    for conversation in task:
        ids, mask = small_tokenizer.render_conversation(conversation, max_tokens=1 << 20)
        assert ids[0] == small_tokenizer.bos_token_id
        assert any(mask), "the assistant must have something to learn"
        assert conversation["messages"][-1]["role"] == "assistant"
        if key in CATEGORICAL:
            assert conversation["messages"][-1]["content"] in conversation["letters"]


def test_task_metadata():
    assert (ARC("ARC-Challenge", source="fixture").name, ARC(source="fixture").eval_type) == ("ARC-Challenge",
                                                                                              "categorical")
    assert (MMLU(source="fixture").name, MMLU.eval_type, MMLU.baseline) == ("MMLU", "categorical", 0.25)
    assert (GSM8K.name, GSM8K.eval_type, GSM8K.baseline) == ("GSM8K", "generative", 0.0)
    assert (HumanEval.name, HumanEval.eval_type, HumanEval.baseline) == ("HumanEval", "generative", 0.0)
    assert ARC(source="fixture").source == "fixture"


def test_slicing_views_the_same_examples():
    full = ARC("ARC-Easy", "test", source="fixture")
    view = ARC("ARC-Easy", "test", source="fixture", start=2, stop=10, step=3)
    assert len(view) == 3
    assert [view[i] for i in range(len(view))] == [full[i] for i in range(2, 10, 3)]
    assert len(ARC("ARC-Easy", "test", source="fixture", stop=1000)) == len(full)
    with pytest.raises(IndexError):
        view[3]


def test_rows_come_in_upstreams_shuffled_order():
    """HF datasets' .shuffle(seed=42) visits rows in np.random.default_rng(42).permutation(n) order."""
    rows = pq.read_table(FIXTURE_DIR / "gsm8k_main_test.parquet").to_pylist()
    order = np.random.default_rng(42).permutation(len(rows))
    task = GSM8K(split="test", source="fixture")
    assert [c["messages"][0]["content"] for c in task] == [rows[i]["question"] for i in order]
    assert list(order) != list(range(len(rows)))  # the check above would pass unshuffled otherwise


def test_fixture_files_match_their_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURE_DIR / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tables = module.tables()
    assert sorted(tables) == sorted(d.fixture for d in DATA.values())
    for name, table in tables.items():
        on_disk = pq.read_table(FIXTURE_DIR / name)
        assert on_disk.schema.equals(table.schema), name
        assert on_disk.to_pylist() == table.to_pylist(), f"{name} is stale: run python tasks/data/make_fixtures.py"


def test_mixture_of_two_fixtures_is_deterministic():
    def mixture(seed):
        return TaskMixture([ARC("ARC-Easy", "train", source="fixture"), GSM8K(split="train", source="fixture")],
                           seed=seed)

    a, b = mixture(42), mixture(42)
    assert len(a) == 24
    first = [a[i]["messages"][0]["content"] for i in range(len(a))]
    assert first == [b[i]["messages"][0]["content"] for i in range(len(b))]
    assert first != [mixture(7)[i]["messages"][0]["content"] for i in range(len(a))]
    assert sum("letters" in a[i] for i in range(len(a))) == 12  # each task contributes all its examples


# ----------------------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize("key", CATEGORICAL)
def test_categorical_accepts_only_the_answer_letter(key):
    task = FIXTURE_TASKS[key](source="fixture")
    for conversation in task:
        answer = conversation["messages"][-1]["content"]
        assert task.evaluate(conversation, answer)
        assert task.reward(conversation, answer) == 1.0
        for letter in conversation["letters"]:
            if letter != answer:
                assert not task.evaluate(conversation, letter)


def test_gsm8k_parts_are_the_calculator_annotations():
    rows = pq.read_table(FIXTURE_DIR / "gsm8k_main_train.parquet").to_pylist()
    by_question = {r["question"]: r["answer"] for r in rows}
    for conversation in GSM8K(split="train", source="fixture"):
        solution = by_question[conversation["messages"][0]["content"]]
        parts = conversation["messages"][-1]["content"]
        calls = re.findall(r"<<([^>]+)>>", solution)
        python = [p["text"] for p in parts if p["type"] == "python"]
        outputs = [p["text"] for p in parts if p["type"] == "python_output"]
        assert [f"{e}={o}" for e, o in zip(python, outputs)] == calls
        rebuilt, pending = "", None
        for part in parts:  # every python part is followed by its output
            if part["type"] == "text":
                rebuilt += part["text"]
            elif part["type"] == "python":
                pending = part["text"]
            else:
                rebuilt += f"<<{pending}={part['text']}>>"
        assert rebuilt == solution
        assert parts[-1]["type"] == "text" and "####" in parts[-1]["text"]
        for expr, out in zip(python, outputs):  # the handmade arithmetic is right
            assert float(eval(expr, {"__builtins__": {}})) == float(out), expr


def test_solution_parts_edge_cases():
    assert solution_parts("<<2+2=4>>4\n#### 4") == [
        {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"},
        {"type": "text", "text": "4\n#### 4"}]
    assert solution_parts("a <<x>> b")[1:3] == [{"type": "python", "text": "x"},
                                                {"type": "python_output", "text": ""}]
    assert solution_parts("a <<1=2=3>> b")[1]["text"] == "1=2"  # the result follows the last "="


@pytest.mark.parametrize("text, number", [
    ("so the answer is\n#### 72", "72"),
    ("#### 1,250 eggs", "1250"),
    ("#### -6", "-6"),
    ("#### 7.5", "7.5"),
    ("#### 1,000", "1000"),
    ("#### -1,000", "-1000"),
    ("#### 3\n#### 4", "3"),
    # as upstream and the official grader: only commas are dropped, and the space after "####" is required
    ("#### 72", "72"),
    ("The total is 72.\n#### 72.", "72."),
    ("####72", None),
    ("the answer is 72", None),
    ("####", None),
])
def test_extract_answer(text, number):
    assert extract_answer(text) == number


def test_gsm8k_a_final_period_or_a_missing_space_is_graded_wrong_as_upstream():
    task = GSM8K(split="test", source="fixture")
    for conversation in task:
        n = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        assert task.evaluate(conversation, f"#### {n}") and task.evaluate(conversation, f"so\n#### {n} clips")
        assert not task.evaluate(conversation, f"#### {n}.") and not task.evaluate(conversation, f"####{n}")


def test_gsm8k_evaluate_compares_the_final_numbers():
    task = GSM8K(split="test", source="fixture")
    for conversation in task:
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        assert reference is not None
        assert task.evaluate(conversation, f"Let me think.\n#### {reference}")
        assert task.reward(conversation, f"#### {reference}") == 1.0
        assert not task.evaluate(conversation, f"#### {int(reference) + 1}")
        assert task.reward(conversation, "I do not know") == 0.0
    big = next(c for c in task if "1,250" in c["messages"][0]["content"])
    assert task.evaluate(big, "#### 37,500")


def test_humaneval_canonical_solutions_pass_and_wrong_code_fails():
    task = HumanEval(source="fixture")
    conversations = list(task)
    assert any("from typing import" in c["messages"][0]["content"] for c in conversations)
    for conversation in conversations:  # the whole program: prompt + canonical solution + tests
        assert task.evaluate(conversation, conversation["messages"][-1]["content"]), conversation["entry_point"]
    add = next(c for c in conversations if c["entry_point"] == "add")
    assert task.evaluate(add, "Here you go:\n```python\ndef add(a, b):\n    return b + a\n```\nDone.")
    assert not task.evaluate(add, "```python\ndef add(a, b):\n    return a - b\n```")
    running = next(c for c in conversations if c["entry_point"] == "running_max")
    # the prompt's imports are added back when a completion rewrites the function without them
    body = running["messages"][-1]["content"].split("from typing import List", 1)[1]
    assert task.evaluate(running, body)


# ----------------------------------------------------------------------------------------------------------
# CustomJSON


def test_customjson_reads_both_line_formats(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        "",
        json.dumps([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]),
    ]
    path.write_text("\n".join(lines) + "\n")
    task = CustomJSON(path, source="hub")  # source is ignored
    assert len(task) == 2
    assert task[1]["messages"][3] == {"role": "assistant", "content": "6"}
    assert len(CustomJSON(path, start=1)) == 1


@pytest.mark.parametrize("bad, problem", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"msgs": []}', "expected"),
    ('[{"role": "user", "content": "hi"}]', "at least"),
    ('[{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]', "expected 'user'"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "expected 'assistant'"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]', "must be a string"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant"}]', '"role" and "content"'),
])
def test_customjson_bad_line_names_file_and_line(tmp_path, bad, problem):
    path = tmp_path / "chats.jsonl"
    good = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    path.write_text(f"{good}\n\n{bad}\n{good}\n")
    with pytest.raises(UserError) as e:
        CustomJSON(path)
    assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value)
    assert "\n" not in str(e.value)


def test_customjson_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        CustomJSON(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------------------
# The hub cache and staging


@pytest.mark.parametrize("key", FIXTURE_TASKS)
def test_unstaged_hub_source_says_how_to_stage(key):
    with pytest.raises(UserError) as e:
        FIXTURE_TASKS[key](source="hub")
    message = str(e.value)
    assert "is not staged" in message and "`python -m tasks.stage`" in message and "\n" not in message


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="source must be"):
        ARC(source="huggingface")
    with pytest.raises(UserError, match="valid: .*ARC-Easy/test"):
        ARC("ARC-Easy", "validation", source="fixture")
    with pytest.raises(UserError, match="valid"):
        MMLU("auxiliary_train", "test", source="fixture")


def test_mirror_urls_and_cache_layout(tmp_path):
    data = DATA[("arc", "ARC-Easy", "test")]
    assert data.mirror_url(data.paths[0], "http://mirror/") == (
        f"http://mirror/datasets/allenai/ai2_arc/resolve/{data.repo.revision}/ARC-Easy/test-00000-of-00001.parquet")
    assert data.cache_path(data.paths[0]) == tmp_path / "base" / "tasks" / "allenai/ai2_arc" / data.paths[0]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fixtures_as_hub_files(groups):
    """(data, path in its repo, parquet bytes) of each fixture of `groups`; a multi-file split gets the fixture cut
    into that many files."""
    import io

    for data in DATA.values():
        if data.group not in groups:
            continue
        table = pq.read_table(FIXTURE_DIR / data.fixture)
        bounds = np.linspace(0, table.num_rows, len(data.paths) + 1).astype(int)
        for path, lo, hi in zip(data.paths, bounds, bounds[1:]):
            buf = io.BytesIO()
            pq.write_table(table.slice(lo, hi - lo), buf)
            yield data, path, buf.getvalue()


def serve_fixtures_as_hub(server, groups):
    """Serve each fixture under its hub URL path, as a site mirror does."""
    for data, path, body in fixtures_as_hub_files(groups):
        server.add(f"/datasets/{data.repo.repo_id}/resolve/{data.repo.revision}/{path}", body)


def test_stage_from_the_hub_at_the_pinned_commits(hub):  # noqa: F811 (fixture)
    for data, path, body in fixtures_as_hub_files(["humaneval", "smoltalk"]):
        hub.add(data.repo, {path: body})
    download_mod.download(["humaneval", "smoltalk"], log=lambda msg: None)
    assert list(HumanEval(source="hub")) == list(HumanEval(source="fixture"))
    assert list(SmolTalk("train", source="hub")) == list(SmolTalk("train", source="fixture"))
    pins = {d.repo.repo_id: d.repo.revision for d in DATA.values()}
    asked = {re.match(r"/datasets/(\w+/[\w-]+)/resolve/(\w+)/", path).groups() for _, path in hub.requests}
    assert asked == {("openai/openai_humaneval", pins["openai/openai_humaneval"]),
                     ("HuggingFaceTB/smol-smoltalk", pins["HuggingFaceTB/smol-smoltalk"])}


def test_stage_then_hub_source_loads_the_same_rows(server, capsys, tmp_path, monkeypatch):  # noqa: F811 (fixture)
    groups = ["arc", "gsm8k", "smoltalk", "spellingbee"]
    serve_fixtures_as_hub(server, groups)
    words = b"apple\nbanana\ncherry\n"  # not on the hub: a mirror keeps the GitHub URL's path
    server.add(urlsplit(WORD_LIST.url).path, words)
    monkeypatch.setattr(download_mod, "WORD_LIST", replace(WORD_LIST, checksum=git_blob_id(words)))
    assert download_mod.main(["--tasks", ",".join(groups), "--base-url", server.url]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = [d for d in DATA.values() if d.group in groups]
    n_files = sum(len(d.paths) for d in expected) + 1
    assert lines[0] == f"downloading {n_files} of {n_files} files ..."
    assert lines[1].startswith("download ") and " MB (100.0%) | " in lines[1]  # the bar's last line, in a log
    assert len(lines) == 2 + n_files and all(line.startswith("downloaded ") for line in lines[2:])
    assert (tmp_path / "base" / "tasks" / "words_alpha.txt").read_bytes() == words
    for data in expected:
        assert all(data.cache_path(p).is_file() for p in data.paths)
        assert not list(data.cache_path(data.paths[0]).parent.glob("*.part"))
    for make in (lambda **kw: ARC("ARC-Challenge", "test", **kw), lambda **kw: GSM8K(split="train", **kw),
                 lambda **kw: SmolTalk("train", **kw)):  # SmolTalk train: 4 files, read back in order
        assert list(make(source="hub")) == list(make(source="fixture"))
    with pytest.raises(UserError, match="not staged"):
        MMLU(source="hub")  # staged only what was asked for
    assert not (tmp_path / "base" / "tasks" / "cais").exists()

    requests = len(server.requests)
    assert download_mod.main(["--tasks", "arc", "--base-url", server.url]) == 0
    assert len(server.requests) == requests  # all present: nothing fetched
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("present ") for line in lines)


def test_stage_rejects_a_file_that_is_not_parquet(server):  # noqa: F811 (fixture)
    data = DATA[("humaneval", "openai_humaneval", "test")]
    server.add(f"/datasets/{data.repo.repo_id}/resolve/{data.repo.revision}/{data.paths[0]}",
               b"<html>rate limited</html>")
    with pytest.raises(UserError, match="invalid file"):
        download_mod.download(["humaneval"], server.url, retries=1, backoff_s=0.01, log=lambda msg: None)
    assert not data.cache_path(data.paths[0]).exists()


def test_stage_offline_and_unknown_task(capsys):
    with pytest.raises(NoNetworkError, match="python -m tasks.stage"):
        download_mod.download(["humaneval"], closed_port_url().rsplit("/", 1)[0], log=lambda msg: None)
    assert download_mod.main(["--tasks", "arc,nope"]) == 2
    assert "unknown task(s) nope" in capsys.readouterr().err
