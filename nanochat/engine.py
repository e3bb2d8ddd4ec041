"""Inference: batched sampling from a GPT with a KV cache, and the calculator tool the chat models call.

The engine works on token ids only (the tokenizer is needed just for the tool: to read the expression a row
wrote and to encode the answer it gets back).

How one call to `Engine.generate` runs:

1. The prompt is run through the model once, with batch 1, filling a batch-1 KV cache exactly as long as the
   prompt. The last position's logits give every row its first token (sampled per row, so rows may differ
   from the very first token when temperature > 0).
2. That cache is broadcast into a batch-`num_samples` cache (`KVCache.expand`), sized for the prompt plus
   the token budget, so the prompt is never recomputed per sample.
3. Each further step feeds the previous column of tokens (one per row) and samples the next column.

The context guard: the decode cache holds `min(len(prompt) + budget, max_positions)` positions, where budget
is `max_tokens` (or the model's `sequence_len` when `max_tokens` is None) and `max_positions` is the length
of the model's rotary tables. Generation stops once prompt + generated tokens fill the cache, so the result
always fits in the model's context and neither the cache nor the rotary tables can overflow.

Tool use, per row: after a row writes `<|python_start|>` the engine collects its tokens until
`<|python_end|>`, decodes them and evaluates them with `use_calculator`. When that gives a result, the
tokens `<|output_start|>`, the result's tokens and `<|output_end|>` are queued for that row; on the
following steps the row takes the next queued token instead of its sampled one (mask 0), one per step,
while the other rows keep sampling. A failed evaluation queues nothing and the model just continues.

A row is done once it emits `<|assistant_end|>` or `<|bos|>`. Done rows keep being fed (the batch stays
rectangular) but what they yield after their stop token is meaningless; `generate_batch` drops it. The
generator ends when every row is done or the budget is used up.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.attention import KVCache

# -----------------------------------------------------------------------------------------------------------
# The calculator tool
#
# Nothing is ever passed to eval(): the expression is parsed with `ast` and a small evaluator walks the tree,
# accepting only these node shapes:
#   - number literals written with digits and at most one dot (no 1e9, 0x10, 1_000, 1j)
#   - unary + and -, binary + - * / // (no **, no %)
#   - parentheses (they leave no node)
#   - '<string literal>'.count('<string literal>'), whose value is an int usable in arithmetic
# Everything else (names, calls other than that one, attribute access, subscripts, lists, f-strings,
# comparisons, ...) is rejected. Without ** the cost of an accepted expression is bounded by its length:
# the expression is capped at MAX_EXPR_CHARS characters, and with only + - * / // an integer result has at
# most as many digits as the literals in the expression together (a float that overflows to inf, or an
# OverflowError, gives None), so every evaluation takes microseconds. That makes a time limit
# unnecessary (upstream's signal.alarm also only works in the main thread; a server answers in threads).

MAX_EXPR_CHARS = 256

_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Rejected(Exception):
    pass


def _is_str_literal(node) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is str


def _evaluate(node, source: str):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, source)
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise _Rejected("only numbers are allowed here")
        written = ast.get_source_segment(source, node)
        if written is None or not _NUMBER.fullmatch(written):
            raise _Rejected("numbers must be plain digits with an optional decimal point")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        return _UNARYOPS[type(node.op)](_evaluate(node.operand, source))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _evaluate(node.left, source), _evaluate(node.right, source)
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.Call):
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "count" and _is_str_literal(func.value)
                and len(node.args) == 1 and _is_str_literal(node.args[0]) and not node.keywords):
            return func.value.value.count(node.args[0].value)
        raise _Rejected("the only call allowed is '<text>'.count('<text>')")
    raise _Rejected(f"{type(node).__name__} is not allowed")


def use_calculator(expr: str) -> str | None:
    """Evaluate a calculator expression the model wrote; the result as a string, or None when the expression
    is not allowed or fails (division by zero, overflow, ...). Allowed: arithmetic with + - * / // and
    parentheses on plain decimal numbers, and string `.count()` calls such as 'strawberry'.count('r').
    Commas are dropped first when the expression has no quotes (so "1,000*3" works), as upstream does.
    The result is `str()` of the Python value, as upstream: 6/3 gives "2.0", 2+3 gives "5"."""
    if not isinstance(expr, str):
        return None
    expr = expr.strip()
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        value = _evaluate(tree, expr)
    except (_Rejected, SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return None
    if type(value) not in (int, float) or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return str(value)


# -----------------------------------------------------------------------------------------------------------
# Sampling


@torch.inference_mode()
def sample_next_token(logits: torch.Tensor, rng: torch.Generator | None = None, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One token per row from logits (B, vocab); returns (B, 1) int64.

    temperature 0: greedy argmax (top_k / top_p are then irrelevant). Otherwise the logits are divided by
    the temperature, restricted to the `top_k` largest (None or 0: no limit), then to the smallest set of
    most likely tokens whose probability reaches `top_p` (None or 1: no limit), renormalized and sampled
    with `rng`."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no limit), got {top_k}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    use_k = top_k is not None and 0 < top_k < logits.size(-1)
    use_p = top_p is not None and top_p < 1.0
    if not (use_k or use_p):
        probs = F.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=rng)
    # candidates in decreasing order of probability
    if use_k:
        vals, idx = torch.topk(logits, top_k, dim=-1, sorted=True)
    else:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(vals.float() / temperature, dim=-1)
    if use_p:
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely candidates
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the first candidate always stays
    choice = torch.multinomial(probs, num_samples=1, generator=rng)
    return idx.gather(-1, choice)


# -----------------------------------------------------------------------------------------------------------
# Engine


class _Row:
    """Generation state of one sample."""

    __slots__ = ("forced", "in_python", "expr_tokens", "done")

    def __init__(self):
        self.forced: deque[int] = deque()  # tool-output tokens waiting to be fed instead of sampling
        self.in_python = False
        self.expr_tokens: list[int] = []
        self.done = False


def max_positions(model) -> int:
    """How many positions the model can encode: the length of its rotary tables (GPT), or failing that its
    `rotary_seq_len` attribute, or its config's sequence_len."""
    cos = getattr(model, "cos", None)
    if isinstance(cos, torch.Tensor) and cos.dim() >= 2:
        return int(cos.size(1))
    if getattr(model, "rotary_seq_len", None):
        return int(model.rotary_seq_len)
    return int(model.config.sequence_len)


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _special(self, name: str) -> int | None:
        """The id of a special token, or None when the tokenizer lacks it (e.g. a tiktoken gpt2 tokenizer)."""
        try:
            return self.tokenizer.encode_special(name)
        except Exception:
            return None

    def _stop_tokens(self) -> set[int]:
        stops = {self.tokenizer.get_bos_token_id(), self._special("<|assistant_end|>")}
        stops.discard(None)
        return stops

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 42):
        """Yield, per decoding step, (token_column, token_masks): each a list of num_samples ints, the next
        token of every row and 1 where the model sampled it or 0 where the engine forced it (tool output).
        At most `max_tokens` steps (None: up to the model's sequence_len more tokens), fewer when every row
        has stopped or the context is full (see the module docstring)."""
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of ints")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        model = self.model
        device = model.get_device()
        limit = max_positions(model)
        if len(tokens) > limit:
            raise ValueError(f"the prompt has {len(tokens)} tokens, more than the model's {limit} positions")
        budget = max_tokens if max_tokens is not None else model.config.sequence_len
        capacity = min(len(tokens) + budget, limit)  # prompt + generated never exceeds this
        if capacity <= len(tokens):
            return

        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        python_start = self._special("<|python_start|>")
        python_end = self._special("<|python_end|>")
        output_start = self._special("<|output_start|>")
        output_end = self._special("<|output_end|>")
        tools = None not in (python_start, python_end, output_start, output_end)
        stops = self._stop_tokens()

        # 1) prefill the prompt once, batch 1
        prefill_cache = KVCache.for_model(model, 1, seq_len=len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(ids, kv_cache=prefill_cache)[:, -1, :]  # (1, vocab)
        # 2) the same prompt state in every row of the decode cache
        cache = prefill_cache.expand(num_samples, seq_len=capacity)
        del prefill_cache
        logits = logits.expand(num_samples, -1)

        rows = [_Row() for _ in range(num_samples)]
        generated = 0
        while True:
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()
            column, masks = [], []
            for i, row in enumerate(rows):
                if row.forced:
                    token, mask = row.forced.popleft(), 0
                else:
                    token, mask = sampled[i], 1
                column.append(token)
                masks.append(mask)
                if row.done:
                    continue
                if token in stops:
                    row.done = True
                    continue
                if not tools:
                    continue
                if token == python_start:
                    row.in_python, row.expr_tokens = True, []
                elif token == python_end and row.in_python:
                    row.in_python = False
                    if row.expr_tokens:
                        result = use_calculator(self.tokenizer.decode(row.expr_tokens))
                        if result is not None:
                            row.forced.extend([output_start, *self.tokenizer.encode(result), output_end])
                    row.expr_tokens = []
                elif row.in_python:
                    row.expr_tokens.append(token)
            yield column, masks
            generated += 1
            if all(row.done for row in rows) or len(tokens) + generated >= capacity:
                return
            # 3) one batched decode step on the column just emitted
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = model(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs):
        """Run `generate` to the end; returns (results, masks): per row, the prompt followed by the generated
        tokens up to (not including) its stop token, and the matching masks (0 for the prompt and for forced
        tokens, 1 for sampled ones)."""
        stops = self._stop_tokens()
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in stops:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks


__all__ = ["Engine", "use_calculator", "sample_next_token", "max_positions", "MAX_EXPR_CHARS"]
