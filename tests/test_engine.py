"""nanochat.engine: cached decoding equals full recomputation, sampling controls, stop tokens, the context
guard, the calculator tool state machine (with a scripted fake model) and the calculator's whitelist."""

import time

import pytest
import torch
import torch.nn as nn

from experiments.random_model import every_path_active
from nanochat.engine import Engine, max_positions, sample_next_token, use_calculator
from nanochat.gpt import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(small_tokenizer):
    """A random model whose every path matters (the zero-initialized projections and the smear get random
    values, lm_head is scaled up so the logits are peaked), with real sliding windows: at sequence_len 64
    the short window would cover the whole context, so the first three layers get 16."""
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=small_tokenizer.get_vocab_size(), n_layer=4, n_head=4,
                    n_kv_head=2, n_embd=128, window_pattern="SSSL")
    m = every_path_active(GPT.build(cfg, device="cpu", compute_dtype=torch.float32))
    m.window_sizes = [(16, 0), (16, 0), (16, 0), (64, 0)]
    return m


@pytest.fixture(scope="module")
def prompt(small_tokenizer):
    ids = small_tokenizer.encode("the value of the cluster is", prepend=small_tokenizer.get_bos_token_id())
    assert 5 <= len(ids) <= 16
    return ids


def stops_of(tok):
    return {tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")}


@torch.no_grad()
def greedy_without_cache(model, prompt, max_tokens, stops):
    """Reference: re-run the full forward on the growing sequence for every new token."""
    seq = list(prompt)
    out = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([seq]))[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if token in stops:
            break
        seq.append(token)
    return out


def run(engine, prompt, **kwargs):
    """All yielded columns of one generate call, as per-row lists of tokens and masks."""
    columns = list(engine.generate(prompt, **kwargs))
    n = kwargs.get("num_samples", 1)
    return [[c[0][i] for c in columns] for i in range(n)], [[c[1][i] for c in columns] for i in range(n)]


# ------------------------------------------------------------------------------------------------- decoding


def test_cached_greedy_equals_full_recompute(model, small_tokenizer, prompt):
    engine = Engine(model, small_tokenizer)
    stops = stops_of(small_tokenizer)
    max_tokens = 64 - len(prompt)  # up to the full context, well past the 16-token windows
    reference = greedy_without_cache(model, prompt, max_tokens, stops)
    assert len(reference) >= 30, "the reference stopped early; the test would not reach past the windows"
    rows, masks = run(engine, prompt, max_tokens=max_tokens, temperature=0.0)
    assert rows[0] == reference
    assert masks[0] == [1] * len(reference)


def test_cache_matters(model, small_tokenizer, prompt):
    """Guard against a vacuous equality: the model's next token depends on more than the last token."""
    a = model(torch.tensor([prompt]))[0, -1]
    b = model(torch.tensor([prompt[-1:]]))[0, -1]
    assert not torch.allclose(a, b, atol=1e-3)


def test_num_samples_greedy_rows_identical(model, small_tokenizer, prompt):
    engine = Engine(model, small_tokenizer)
    one, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=24, temperature=0.0)
    four, masks = engine.generate_batch(prompt, num_samples=4, max_tokens=24, temperature=0.0)
    assert len(four) == 4 and all(row == one[0] for row in four)
    assert all(m == [0] * len(prompt) + [1] * (len(one[0]) - len(prompt)) for m in masks)
    assert four[0][:len(prompt)] == prompt and len(four[0]) > len(prompt)


def test_seeded_sampling_reproducible_and_seed_dependent(model, small_tokenizer, prompt):
    engine = Engine(model, small_tokenizer)
    kw = dict(num_samples=3, max_tokens=16, temperature=1.0)
    a, _ = engine.generate_batch(prompt, seed=123, **kw)
    b, _ = engine.generate_batch(prompt, seed=123, **kw)
    c, _ = engine.generate_batch(prompt, seed=124, **kw)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1, "rows of one call should be independent samples"


def test_top_k_1_and_tiny_top_p_equal_greedy(model, small_tokenizer, prompt):
    engine = Engine(model, small_tokenizer)
    greedy, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=20, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=20, temperature=1.0, top_k=1, seed=7)
    nucleus, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=20, temperature=1.0, top_p=1e-6, seed=7)
    assert top1 == greedy
    assert nucleus == greedy


def test_sample_next_token_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, -1)
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits[:3], rng, temperature=0.0).flatten().tolist() == [0, 0, 0]
    picks = sample_next_token(logits, rng, temperature=1.0, top_k=2).flatten()
    assert set(picks.tolist()) == {0, 1}
    picks = sample_next_token(logits, rng, temperature=1.0, top_p=0.7).flatten()  # 0.5 < 0.7 <= 0.8
    assert set(picks.tolist()) == {0, 1}
    assert 0.55 < (picks == 0).float().mean().item() < 0.70  # renormalized: 0.5/0.8 = 0.625
    picks = sample_next_token(logits, rng, temperature=1.0).flatten()
    assert set(picks.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        sample_next_token(logits, rng, temperature=-1.0)
    with pytest.raises(ValueError):
        sample_next_token(logits, rng, temperature=1.0, top_p=0.0)


def test_max_tokens_respected(model, small_tokenizer, prompt):
    engine = Engine(model, small_tokenizer)
    for n in (0, 1, 7):
        rows, _ = run(engine, prompt, num_samples=2, max_tokens=n, temperature=0.0)
        assert all(len(r) <= n for r in rows)
    rows, _ = run(engine, prompt, num_samples=2, max_tokens=7, temperature=0.0)
    assert len(rows[0]) == 7  # the greedy reference runs >= 30 tokens without stopping


# ------------------------------------------------------------------------------------------- scripted model


class ScriptedModel(nn.Module):
    """Same forward signature as GPT; the next token depends only on the current input token, looked up in
    `table` (an int, or a tuple of equally likely ints), else `default`. Records everything it is fed."""

    def __init__(self, vocab_size, table, default, positions=64):
        super().__init__()
        self.config = GPTConfig(sequence_len=positions, vocab_size=vocab_size, n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=8)
        self.rotary_seq_len = positions
        self.compute_dtype = torch.float32
        self.register_buffer("anchor", torch.zeros(1))
        self.table, self.default = table, default
        self.fed = []  # one (B, T) list per call

    def get_device(self):
        return self.anchor.device

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.shape
        if kv_cache is not None:
            assert kv_cache.get_pos() + T <= kv_cache.max_seq_len, "fed past the cache"
        self.fed.append(idx.tolist())
        logits = torch.full((B, T, self.config.vocab_size), -20.0)
        for b in range(B):
            for t in range(T):
                nxt = self.table.get(int(idx[b, t]), self.default)
                for n in (nxt if isinstance(nxt, tuple) else (nxt,)):
                    logits[b, t, n] = 20.0
        if kv_cache is not None:
            kv_cache.advance(T)
        return logits


def chain(*tokens):
    return {a: b for a, b in zip(tokens, tokens[1:])}


def specials(tok):
    names = ["bos", "assistant_start", "assistant_end", "python_start", "python_end", "output_start", "output_end"]
    ids = {n: tok.encode_special(f"<|{n}|>") for n in names[1:]}
    ids["bos"] = tok.get_bos_token_id()
    return ids


def test_tool_output_is_forced_then_generation_continues(small_tokenizer):
    tok = small_tokenizer
    s = specials(tok)
    expr = tok.encode("2+3")
    (after,) = tok.encode(" ok")[:1]
    assert len(set(expr)) == len(expr)
    table = chain(s["assistant_start"], s["python_start"], *expr, s["python_end"], s["assistant_end"])
    table[s["output_end"]] = after
    table[after] = s["assistant_end"]
    # if the engine did not force the output, the row would end right after <|python_end|>
    model = ScriptedModel(tok.get_vocab_size(), table, default=s["bos"])
    engine = Engine(model, tok)
    prompt = [s["bos"], s["assistant_start"]]
    rows, masks = run(engine, prompt, num_samples=2, max_tokens=40, temperature=0.0)
    five = tok.encode("5")
    expected = [s["python_start"], *expr, s["python_end"], s["output_start"], *five, s["output_end"],
                after, s["assistant_end"]]
    expected_mask = [1] * (len(expr) + 2) + [0] * (len(five) + 2) + [1, 1]
    assert rows == [expected, expected] and masks == [expected_mask, expected_mask]
    assert tok.decode(expected[len(expr) + 2:len(expr) + 5 + len(five) - 1]).startswith("<|output_start|>5")
    # the forced tokens were fed to the model like any other: prompt once, then every column but the last
    assert model.fed[0] == [prompt]
    assert [step[0][0] for step in model.fed[1:]] == expected[:-1]

    results, batch_masks = engine.generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    assert results == [prompt + expected[:-1]] * 2
    assert batch_masks == [[0, 0] + expected_mask[:-1]] * 2


def test_failed_tool_call_injects_nothing(small_tokenizer):
    tok = small_tokenizer
    s = specials(tok)
    expr = tok.encode("7/0")  # division by zero: no result
    (after,) = tok.encode(" ok")[:1]
    table = {s["assistant_start"]: s["python_start"], s["python_start"]: expr[0], s["python_end"]: after,
             after: s["assistant_end"]}
    table.update({a: b for a, b in zip(expr, expr[1:])})
    table[expr[-1]] = s["python_end"]
    assert len(table) == 4 + len(expr), "the scripted chain needs distinct tokens"
    engine = Engine(ScriptedModel(tok.get_vocab_size(), table, default=s["bos"]), tok)
    rows, masks = run(engine, [s["bos"], s["assistant_start"]], max_tokens=40, temperature=0.0)
    assert rows[0] == [s["python_start"], *expr, s["python_end"], after, s["assistant_end"]]
    assert masks[0] == [1] * len(rows[0])


def test_tool_state_is_per_row(small_tokenizer):
    """Rows that diverge at the first token: only those that call the tool get forced tokens."""
    tok = small_tokenizer
    s = specials(tok)
    expr = tok.encode("2+3")
    (plain,) = tok.encode(" the")[:1]
    table = chain(s["python_start"], *expr, s["python_end"], s["assistant_end"])
    table[s["assistant_start"]] = (s["python_start"], plain)  # a coin flip per row
    table[s["output_end"]] = s["assistant_end"]
    table[plain] = s["assistant_end"]
    engine = Engine(ScriptedModel(tok.get_vocab_size(), table, default=s["bos"]), tok)
    results, masks = engine.generate_batch([s["bos"], s["assistant_start"]], num_samples=8, max_tokens=40,
                                           temperature=1.0, seed=3)
    tool_rows = [r for r in results if r[2] == s["python_start"]]
    plain_rows = [r for r in results if r[2] == plain]
    assert tool_rows and plain_rows and len(tool_rows) + len(plain_rows) == 8
    five = tok.encode("5")
    assert all(r[2:] == [s["python_start"], *expr, s["python_end"], s["output_start"], *five, s["output_end"]]
               for r in tool_rows)
    assert all(r[2:] == [plain] for r in plain_rows)
    for r, m in zip(results, masks):
        forced = [t for t, k in zip(r[2:], m[2:]) if k == 0]
        assert forced == ([s["output_start"], *five, s["output_end"]] if r[2] == s["python_start"] else [])


def test_stop_tokens_end_rows(small_tokenizer):
    tok = small_tokenizer
    s = specials(tok)
    (a,) = tok.encode(" the")[:1]
    for stop in (s["assistant_end"], s["bos"]):
        model = ScriptedModel(tok.get_vocab_size(), {s["assistant_start"]: a, a: stop}, default=a)
        rows, _ = run(Engine(model, tok), [s["bos"], s["assistant_start"]], num_samples=3, max_tokens=40)
        assert rows == [[a, stop]] * 3  # the generator ends once every row is done
        results, _ = Engine(model, tok).generate_batch([s["bos"], s["assistant_start"]], max_tokens=40)
        assert results == [[s["bos"], s["assistant_start"], a]]


def test_context_guard(small_tokenizer):
    """Generation stops when prompt + generated fills the model's positions, whatever max_tokens says."""
    tok = small_tokenizer
    (a,) = tok.encode(" the")[:1]
    model = ScriptedModel(tok.get_vocab_size(), {}, default=a, positions=12)
    engine = Engine(model, tok)
    prompt = [tok.get_bos_token_id()] + [a] * 3
    assert max_positions(model) == 12
    for max_tokens in (None, 8, 100):
        rows, _ = run(engine, prompt, max_tokens=max_tokens, temperature=0.0)
        assert len(prompt) + len(rows[0]) == 12
    rows, _ = run(engine, prompt, max_tokens=5, temperature=0.0)
    assert len(rows[0]) == 5
    with pytest.raises(ValueError):
        list(engine.generate([a] * 13))
    assert list(engine.generate([a] * 12)) == []


def test_context_guard_real_model(model, small_tokenizer):
    """A prompt near the end of the rotary tables (10x sequence_len) decodes to their end, no further."""
    engine = Engine(model, small_tokenizer)
    limit = max_positions(model)
    assert limit == model.cos.size(1) == 640
    prompt = small_tokenizer.encode("the " * 700)[:limit - 3]
    rows, _ = run(engine, prompt, num_samples=2, max_tokens=50, temperature=0.0)
    assert 1 <= len(rows[0]) <= 3


# ---------------------------------------------------------------------------------------------- calculator


@pytest.mark.parametrize("expr, expected", [
    ("1+2*3", "7"),
    ("(4-1)/2", "1.5"),
    ("'strawberry'.count('r')", "3"),
    ('"banana".count("an") + 1', "3"),
    ("1,000*3", "3000"),
    (" 10 - -2 ", "12"),
    ("7//2", "3"),
    ("6/3", "2.0"),
    (".5+1.", "1.5"),
    ("9" * 100 + "*" + "9" * 100, str(int("9" * 100) ** 2)),
])
def test_calculator_allows(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "2**100", "2**3", "__import__('os')", "__import__('os').system('true')", "open('x')", "'a'.upper()",
    "[1]*10**9", "x+1", "1/0", "1e999", "1e5", "0x10", "1_000", "2j", "(1).real", "True+1", "'a'*3",
    "'a'.count('a', 0)", "'a'.count(x)", "str.count('a', 'a')", "().__class__", "{'a': 1}", "1 if 1 else 2",
    "1 < 2", "5 % 3", "1 << 64", "lambda: 1", "f'{1}'", "", "   ", "1 +", "9" * 300, "(" * 150 + "1" + ")" * 150,
])
def test_calculator_rejects(expr):
    t0 = time.perf_counter()
    assert use_calculator(expr) is None
    assert time.perf_counter() - t0 < 0.1
