"""nanochat.core_eval: the CORE metric over a small handmade eval bundle whose right answers are known."""

import json

import pytest
import torch
from torch import nn

from nanochat import core_eval
from nanochat.common import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CITIES = {"France": "Paris", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid", "Japan": "Tokyo",
          "Egypt": "Cairo"}


def _capital_question(i: int, country: str, city: str) -> dict:
    distractors = [c for c in CITIES.values() if c != city][i % 2:][:3]
    gold = i % 4  # the right answer in every position
    return {"query": f"Question: what is the capital of {country}?\nAnswer:",
            "choices": distractors[:gold] + [city] + distractors[gold:], "gold": gold}


MC = [_capital_question(i, country, city) for i, (country, city) in enumerate(CITIES.items())]  # baseline 25%

SCHEMA = [  # 2 context options, baseline 50%
    {"context_options": [f"The {a} chased the {b} because the {a}", f"The {a} chased the {b} because the {b}"],
     "continuation": "was hungry.", "gold": 0} for a, b in [("cat", "mouse"), ("dog", "ball"), ("fox", "hen")]
] + [
    {"context_options": [f"The {a} fled from the {b} because the {b}", f"The {a} fled from the {b} because the {a}"],
     "continuation": "was scared.", "gold": 1} for a, b in [("bird", "cat"), ("deer", "wolf")]
]

LM = [  # exact continuation, baseline 0
    {"context": f"Repeat the word {w}. ", "continuation": w} for w in ["apple", "river", "stone", "cloud", "field"]
]

TASKS = [
    ("capitals", "multiple_choice", "capitals.jsonl", 1, 25.0, MC),
    ("winograd", "schema", "schema/winograd.jsonl", 0, 50.0, SCHEMA),
    ("copy", "language_modeling", "lm/copy.jsonl", 2, 0.0, LM),
]
BASELINES = {label: pct / 100 for label, _, _, _, pct, _ in TASKS}


def write_bundle(folder):
    lines = ["icl_tasks:"]
    for label, kind, uri, shots, _, data in TASKS:
        lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", "  continuation_delimiter: ' '"]
        path = folder / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(ex) + "\n" for ex in data))
    (folder / "core.yaml").write_text("\n".join(lines) + "\n")
    rows = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    rows += [f"{label},x,{kind},{shots},{len(data)},{pct},yes,handmade" for label, kind, _, shots, pct, data in TASKS]
    (folder / "eval_meta_data.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "eval_bundle")


def right_endings(wrong: bool = False) -> list[str]:
    """The text a candidate sequence ends with when it holds the right (or, with wrong=True, a wrong) answer."""
    out = []
    for ex in MC:
        pick = (ex["gold"] + 1) % 4 if wrong else ex["gold"]
        out.append(f"{ex['query']} {ex['choices'][pick]}")
    for ex in SCHEMA:
        pick = 1 - ex["gold"] if wrong else ex["gold"]
        out.append(f"{ex['context_options'][pick]} {ex['continuation']}")
    if not wrong:
        out += [f"{ex['context'].strip()} {ex['continuation']}" for ex in LM]
    return out


class MemorizingLM(nn.Module):
    """A fake with GPT's forward signature. A sequence that ends with one of `endings` gets a confident, correct
    next-token prediction at every position (low loss, greedy = the actual tokens); any other sequence gets a
    confident wrong one (high loss, greedy != the actual tokens). Right padding (BOS) is ignored."""

    def __init__(self, tokenizer, endings, hit=20.0, miss=20.0, miss_shift=1):
        super().__init__()
        self.tok, self.endings = tokenizer, tuple(endings)
        self.hit, self.miss, self.miss_shift = hit, miss, miss_shift
        self.vocab = tokenizer.get_vocab_size()
        self.seen = []  # decoded rows, in call order

    def forward(self, idx, targets=None):
        bos = self.tok.get_bos_token_id()
        nxt = torch.roll(idx, shifts=-1, dims=1)
        logits = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            text = self.tok.decode([t for t in row if t != bos])
            self.seen.append(text)
            hit = text.endswith(self.endings)
            target = nxt[b] if hit else (nxt[b] + self.miss_shift) % self.vocab
            logits[b].scatter_(1, target[:, None], self.hit if hit else self.miss)
        return logits


def test_oracle_scores_one_everywhere(bundle, small_tokenizer):
    model = MemorizingLM(small_tokenizer, right_endings())
    out = core_eval.evaluate_core(model, small_tokenizer, "cpu", bundle_dir=bundle)
    assert out["results"] == {"capitals": 1.0, "winograd": 1.0, "copy": 1.0}
    assert out["centered_results"] == pytest.approx({"capitals": 1.0, "winograd": 1.0, "copy": 1.0})
    assert out["core_metric"] == pytest.approx(1.0)


def test_adversary_scores_zero_and_is_centered_below_chance(bundle, small_tokenizer):
    model = MemorizingLM(small_tokenizer, right_endings(wrong=True))
    out = core_eval.evaluate_core(model, small_tokenizer, "cpu", bundle_dir=bundle)
    assert out["results"] == {"capitals": 0.0, "winograd": 0.0, "copy": 0.0}
    expected = {k: -b / (1 - b) for k, b in BASELINES.items()}  # -1/3, -1, 0
    assert out["centered_results"] == pytest.approx(expected)
    assert out["core_metric"] == pytest.approx(sum(expected.values()) / 3)


def test_partial_accuracy_and_centering(bundle, small_tokenizer):
    # right on capitals and copy, wrong on winograd: 1, 0 -> centered 1, -1, 1
    endings = right_endings()[:len(MC)] + right_endings(wrong=True)[len(MC):] + right_endings()[-len(LM):]
    out = core_eval.evaluate_core(MemorizingLM(small_tokenizer, endings), small_tokenizer, "cpu", bundle_dir=bundle)
    assert out["results"] == {"capitals": 1.0, "winograd": 0.0, "copy": 1.0}
    assert out["core_metric"] == pytest.approx((1 - 1 + 1) / 3)
    assert core_eval.centered(0.5, 0.25) == pytest.approx(1 / 3)


def test_choice_is_by_mean_loss_not_total(small_tokenizer):
    # the right answer is long with a low loss per token, the wrong one short with a higher loss per token:
    # the mean picks the long one, the total would pick the short one
    item = {"query": "Question: what is Paris?\nAnswer:", "gold": 0,
            "choices": ["the capital city of France, on the river Seine, home of the Louvre", "a cat"]}
    task = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}
    model = MemorizingLM(small_tokenizer, [f"Answer: {item['choices'][0]}"], hit=8.0, miss=6.0, miss_shift=0)
    tokens, starts, ends = core_eval.candidate_spans(
        small_tokenizer, "multiple_choice", core_eval.render_multiple_choice(item, " ", []))
    assert ends[0] - starts[0] >= 4 * (ends[1] - starts[1])  # long vs short, so the total really disagrees
    assert core_eval.evaluate_example(model, small_tokenizer, [item], 0, task, "cpu")


def test_max_per_task_takes_a_shuffled_subset(bundle, small_tokenizer):
    model = MemorizingLM(small_tokenizer, right_endings())
    out = core_eval.evaluate_core(model, small_tokenizer, "cpu", bundle_dir=bundle, max_per_task=3)
    assert out["core_metric"] == pytest.approx(1.0)
    task = core_eval.load_bundle(bundle)[0]
    subset = core_eval.load_task_data(task, 3)
    assert len(subset) == 3 and subset == core_eval.load_task_data(task, 3)
    assert subset != MC[:3]  # shuffled with the fixed seed, not the file's order


def test_real_gpt_runs_end_to_end(bundle, small_tokenizer):
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=small_tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                       n_kv_head=2, n_embd=32, window_pattern="L")
    model = GPT.build(config, device="cpu")
    model.train()
    out = core_eval.evaluate_core(model, small_tokenizer, "cpu", bundle_dir=bundle)
    assert model.training  # left as it was found
    assert set(out["results"]) == {"capitals", "winograd", "copy"}
    for label, acc in out["results"].items():
        assert 0.0 <= acc <= 1.0
        assert out["centered_results"][label] == pytest.approx(core_eval.centered(acc, BASELINES[label]))
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)


def test_fewshot_excludes_the_example_and_is_deterministic(bundle, small_tokenizer):
    for idx in range(6):
        picks = core_eval.fewshot_indices(idx, 6, 3)
        assert idx not in picks and len(set(picks)) == 3
        assert picks == core_eval.fewshot_indices(idx, 6, 3)
    assert core_eval.fewshot_indices(0, 6, 0) == []
    assert len({tuple(core_eval.fewshot_indices(i, 100, 5)) for i in range(10)}) == 10  # a draw per example

    runs = []
    for _ in range(2):
        model = MemorizingLM(small_tokenizer, right_endings())
        core_eval.evaluate_core(model, small_tokenizer, "cpu", bundle_dir=bundle)
        runs.append(model.seen)
    assert runs[0] == runs[1]
    mc_rows = [row for row in runs[0] if "capital" in row]
    assert len(mc_rows) == 4 * len(MC)
    for row in mc_rows:  # 1-shot: exactly two questions, and the example's own one only once (at the end)
        assert row.count("Question:") == 2
        own = row.rsplit("Question:", 1)[1]
        assert row.count(own.split("?")[0]) == 1
        shot = row.split("\n\n")[0]  # the shot is answered with its gold choice
        country = shot.split("capital of ")[1].split("?")[0]
        assert shot.endswith(f"Answer: {CITIES[country]}")
    lm_rows = [row for row in runs[0] if "Repeat" in row]
    for row in lm_rows:  # 2-shot, separated by blank lines, own context last and only once
        blocks = row.split("\n\n")
        assert len(blocks) == 3
        words = [b.split("Repeat the word ")[1].split(".")[0] for b in blocks]
        assert len(set(words)) == 3 and blocks[-1].endswith(f"{words[-1]}. {words[-1]}")


def test_rendering_and_scored_spans(small_tokenizer):
    tok = small_tokenizer
    shot, item = MC[0], MC[1]
    prompts = core_eval.render_multiple_choice(item, " ", [shot])
    assert prompts[item["gold"]] == (f"{shot['query']} {shot['choices'][shot['gold']]}\n\n"
                                     f"{item['query']} {item['choices'][item['gold']]}")
    tokens, starts, ends = core_eval.candidate_spans(tok, "multiple_choice", prompts)
    assert len({tuple(t[:s]) for t, s in zip(tokens, starts)}) == 1  # a shared context
    for t, s, e, choice in zip(tokens, starts, ends, item["choices"]):
        assert e == len(t) and s < e and (" " + choice).endswith(tok.decode(t[s:e]))

    prompts = core_eval.render_schema(SCHEMA[0], " ", [])
    tokens, starts, ends = core_eval.candidate_spans(tok, "schema", prompts)
    spans = {tok.decode(t[s:e]) for t, s, e in zip(tokens, starts, ends)}
    assert len(spans) == 1 and spans.pop().endswith(" was hungry.")
    assert tokens[0][:starts[0]] != tokens[1][:starts[1]]

    ex = {"context": "Repeat the word apple.   ", "continuation": "apple"}
    without, with_ = core_eval.render_language_modeling(ex, " ", [LM[1]])
    assert without == "Repeat the word river. river\n\nRepeat the word apple."  # trimmed
    assert with_ == without + " apple"
    tokens, starts, ends = core_eval.candidate_spans(tok, "language_modeling", [without, with_])
    assert len(tokens) == 1 and tok.decode(tokens[0][starts[0]:ends[0]]) == " apple"


def test_max_seq_len_crops_from_the_left():
    tokens, starts, ends = core_eval.crop_to([[1, 2, 3, 4, 5, 6], [1, 2, 3]], [4, 2], [6, 3], 4)
    assert tokens == [[3, 4, 5, 6], [1, 2, 3]] and starts == [2, 2] and ends == [4, 3]
    with pytest.raises(ValueError):
        core_eval.crop_to([[1, 2, 3, 4, 5, 6]], [2], [6], 4)


def test_missing_bundle_names_the_staging_command(tmp_path, small_tokenizer):
    with pytest.raises(core_eval.EvalBundleMissing) as err:  # a UserError: one line, exit code 2
        core_eval.evaluate_core(nn.Identity(), small_tokenizer, "cpu", bundle_dir=tmp_path / "nope")
    message = str(err.value)
    assert "python -m nanochat.dataset --assets-only" in message and "\n" not in message
    with pytest.raises(UserError, match="--assets-only"):  # default location: $NANOCHAT_BASE_DIR/eval_bundle
        core_eval.load_bundle()


def test_missing_task_file_or_baseline_is_a_user_error(bundle):
    (bundle / "eval_data" / "lm" / "copy.jsonl").unlink()
    with pytest.raises(UserError, match="copy") as err:
        core_eval.load_bundle(bundle)
    assert not isinstance(err.value, core_eval.EvalBundleMissing)  # staged but broken: not "missing"
    write_bundle(bundle)
    meta = bundle / "eval_meta_data.csv"
    meta.write_text("\n".join(meta.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(UserError, match="'copy' has no random baseline"):
        core_eval.load_bundle(bundle)


def test_should_stop_returns_none(bundle, small_tokenizer):
    calls = []

    def stop_on_third():
        calls.append(1)
        return len(calls) >= 3

    model = MemorizingLM(small_tokenizer, right_endings())
    assert core_eval.evaluate_core(model, small_tokenizer, "cpu", bundle_dir=bundle,
                                   should_stop=stop_on_third) is None
    assert len(calls) == 3 and len(model.seen) == 2 * 4  # two MC examples of four candidates each, then stopped


def test_a_labelled_evaluation_shows_each_tasks_progress_in_a_log(bundle, small_tokenizer, capsys):
    model = MemorizingLM(small_tokenizer, right_endings())
    core_eval.evaluate_core(model, small_tokenizer, "cpu", bundle_dir=bundle)
    assert capsys.readouterr().out == ""  # no label, no bar: CORE inside base_train stays quiet
    core_eval.evaluate_core(model, small_tokenizer, "cpu", bundle_dir=bundle, progress_label="base_eval CORE")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == [f"base_eval CORE {label} {len(rows)}/{len(rows)} (100.0%)"
                                                        for label, rows in [("capitals", MC), ("winograd", SCHEMA),
                                                                            ("copy", LM)]]
    assert all(line.endswith(" example/s") for line in lines)  # a rate; no ETA once done


def test_ranks_split_examples_and_sum_counts(bundle, small_tokenizer, monkeypatch):
    """Rank r of 2 evaluates examples r::2; the summed counts give the single-process result. A stop on one
    rank makes every rank return None (one all-reduce per task either way: nobody is left waiting)."""
    def run(rank, reduce, should_stop=None):
        monkeypatch.setattr(core_eval, "_dist_info", lambda: (rank, 2))
        monkeypatch.setattr(core_eval, "_all_reduce_sum", reduce)
        model = MemorizingLM(small_tokenizer, right_endings())
        return core_eval.evaluate_core(model, small_tokenizer, "cpu", bundle_dir=bundle, should_stop=should_stop)

    rank1 = []
    partial = run(1, lambda t: rank1.append(t.clone()) or t)
    assert len(rank1) == 3  # one reduce per task
    for counts, n in zip(rank1, (len(MC), len(SCHEMA), len(LM))):
        assert counts[:-1].tolist() == [float(i % 2 == 1) for i in range(n)] and counts[-1] == 0
    assert partial["results"]["capitals"] == pytest.approx(3 / 6)  # only its own half

    it = iter(rank1)
    full = run(0, lambda t: t + next(it))
    assert full["results"] == {"capitals": 1.0, "winograd": 1.0, "copy": 1.0}

    stopped = []
    run(1, lambda t: stopped.append(t.clone()) or t, should_stop=lambda: True)
    it = iter(stopped)
    assert run(0, lambda t: t + next(it)) is None


def test_eval_bundle_is_staged_from_a_mirror_and_unpacked(tmp_path, small_tokenizer, monkeypatch):
    import hashlib
    import io
    import zipfile
    from dataclasses import replace

    from test_download import FileServer  # tests/ is on sys.path under pytest

    from nanochat import assets, registry

    src = write_bundle(tmp_path / "src" / "eval_bundle")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # upstream's layout: one top-level eval_bundle/ folder
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(src.parent).as_posix())
    bundle = replace(registry.EVAL_BUNDLE, checksum=hashlib.sha256(buf.getvalue()).hexdigest())  # ours, not DCLM's
    monkeypatch.setattr(assets, "ARCHIVES", [bundle])
    srv = FileServer()
    try:
        srv.add("/eval_bundle.zip", buf.getvalue())
        assert bundle.url.endswith("/eval_bundle.zip")
        [folder] = assets.stage_archives(1, base_url_override=srv.url, backoff_s=0.01, log=lambda _: None)
    finally:
        srv.close()
    assert folder == core_eval.default_bundle_dir() and (folder / "core.yaml").is_file()
    assert not assets.asset_path(bundle).exists()  # the zip is gone once unpacked
    assert assets.archive_jobs("http://127.0.0.1:9") == []  # staged: nothing left to do
    out = core_eval.evaluate_core(MemorizingLM(small_tokenizer, right_endings()), small_tokenizer, "cpu")
    assert out["core_metric"] == pytest.approx(1.0)


def test_base_eval_scores_every_example_unless_told_and_labels_a_subsample(small_tokenizer):
    from types import SimpleNamespace

    from nanochat.config import Config
    from nanochat.stages.base_eval import _core

    write_bundle(core_eval.default_bundle_dir())  # where base_eval looks: $NANOCHAT_BASE_DIR/eval_bundle
    half = len(MC) // 2  # right on the first half of the capitals questions only: the full set scores exactly half/n
    endings = right_endings()[:half] + right_endings(wrong=True)[half:len(MC)] + right_endings()[len(MC):]
    model, cfg = MemorizingLM(small_tokenizer, endings), Config()
    cfg.core_metric_max_per_task = 3  # pretraining's periodic CORE subsamples (as upstream's); base_eval does not
    progress = SimpleNamespace(should_stop=lambda: False)
    full = _core(cfg, model, small_tokenizer, "cpu", progress)
    assert full["results"]["capitals"] == pytest.approx(half / len(MC)) and "core_metric_note" not in full
    cfg.base_eval.max_per_task = 3
    sub = _core(cfg, model, small_tokenizer, "cpu", progress)
    assert sub["core_metric_note"] == "at most 3 examples per task, not the leaderboard's all"
    assert any(sub["results"]["capitals"] == pytest.approx(k / 3) for k in range(4))


def _two_rank_core(rank, port, bundle, out):
    import datetime
    import os

    import torch.distributed as dist

    from conftest import synthetic_docs
    from nanochat.distributed import agree
    from nanochat.tokenizer import Tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        tokenizer = Tokenizer.train(iter(synthetic_docs(400, seed=1)), vocab_size=400)  # the small_tokenizer fixture's
        result = core_eval.evaluate_core(MemorizingLM(tokenizer, right_endings()[::2]), tokenizer, "cpu",
                                         bundle_dir=bundle, should_stop=lambda: agree(False)[0])
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_score_what_one_rank_scores_on_tasks_of_odd_size(bundle, small_tokenizer, tmp_path):
    """5 examples on 2 ranks: 3 and 2. Both ask whether to stop (a collective, as base_eval does) equally often."""
    import torch.multiprocessing as mp

    from test_optim import free_port

    one = core_eval.evaluate_core(MemorizingLM(small_tokenizer, right_endings()[::2]), small_tokenizer, "cpu",
                                  bundle_dir=bundle)
    mp.spawn(_two_rank_core, args=(free_port(), str(bundle), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt")["results"] == pytest.approx(one["results"])
