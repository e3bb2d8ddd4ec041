"""`python -m experiments.bench infer`: prefill and decode with the KV-cache engine on a random-init model, over
prompt lengths and batch sizes, beside what the model's shape says they cost.

One `Engine.generate` call per (prompt, batch), after an untimed warm-up call of the same shape:
- TTFT (time to first token): the engine's prefill, which runs the prompt once at batch 1 whatever the batch,
  copies its cache into the batch's rows and samples every row's first token.
- TPOT (time per output token): the median of the decode steps that follow; each step feeds one token per row.
- decode tok/s: all rows' decoded tokens over the decode steps' total time.
- bytes/step: what a decode step must read from memory: every matmul weight as stored (the cast to the compute
  dtype happens on the fly), one embedding row per sample and table, and each row's KV cache as far as the
  layers' windows reach, at the middle decode position. GB/s is that over TPOT; MBU that over the device's
  peak bandwidth (unknown on CPU and for GPUs without a datasheet figure in nanochat.distributed.PEAKS).
- FLOPs/token: forward FLOPs of a prompt token (prefill) and of a decoded token at the middle position
  (nanochat.model_config.prefill_flops / decode_flops).
A random model with the stop tokens out of its reach (experiments.random_model.NoStops) never stops early, so
every row runs to --tokens.

The decode runs eagerly unless --compile, which hands the engine torch.compile(model, dynamic=True) as it is:
the step does not compile whole, since the cache position is read back to the host every step (KVCache.get_pos
for the rotary offset and, on the SDPA path, each layer's cache slicing), and dynamo breaks the graph there.
"""

import statistics
from dataclasses import dataclass

import torch

from experiments.decode_timing import step_times
from experiments.random_model import NoStops
from nanochat.common import UserError
from nanochat.distributed import autodetect_device, compute_dtype, peak_bandwidth
from nanochat.engine import Engine
from nanochat.gpt import GPT, Linear, model_config_for_depth
from nanochat.model_config import (decode_flops, kv_cache_bytes_per_token, kv_cache_bytes_read, padded_vocab_size,
                                   prefill_flops)
from nanochat.stages.training import device_name


@dataclass
class Generation:
    ttft: float  # seconds
    step_times: list[float]  # seconds per decode step, each for every row at once
    peak_memory: int | None  # bytes, CUDA only

    @property
    def tpot(self) -> float:
        return statistics.median(self.step_times)


def time_generation(engine: Engine, prompt: list[int], batch: int, tokens: int) -> Generation:
    """One generate call of `tokens` tokens per row. Each step's timing is exact on a GPU too: the engine reads
    the sampled tokens back to the host (`.tolist()`) before it yields them, which waits for the device."""
    device = engine.model.get_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttft, steps = step_times(engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=1.0))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Generation(ttft, steps, peak)


def matmul_weight_bytes(model) -> int:
    """Every matmul weight as stored: each decode step reads all of them, whatever the batch."""
    return sum(m.weight.nelement() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear))


def embedding_row_bytes(model) -> int:
    """One row of the token embedding and of each value-embedding table: what a sample's step reads of them."""
    tables = [model.transformer.wte, *model.value_embeds.values()]
    return sum(t.weight[0].nelement() * t.weight.element_size() for t in tables)


def decode_bytes_per_step(model, batch: int, position: int) -> int:
    """Bytes the decode step at `position` reads: the weights, and per row its embedding rows and KV cache."""
    kv = kv_cache_bytes_read(model.config, position, model.compute_dtype.itemsize)
    return matmul_weight_bytes(model) + batch * (embedding_row_bytes(model) + kv)


def bandwidth_peak(device: torch.device) -> tuple[float | None, str]:
    """The device's peak memory bandwidth (bytes/s), None where unknown (a CPU, an unlisted GPU), and a line
    saying which."""
    name = device_name(device)
    peak = peak_bandwidth(name)
    return peak, f"{name}: " + (f"peak bandwidth {peak / 1e12:.2f} TB/s" if peak else
                                "no peak bandwidth on record (nanochat/distributed.py PEAKS), MBU unknown")


@dataclass
class InferRow:
    prompt: int
    batch: int
    generation: Generation
    prefill_flops_per_token: float
    decode_flops_per_token: int
    bytes_per_step: int
    mbu: float | None  # a fraction

    @property
    def decode_tok_per_sec(self) -> float:
        return self.batch * len(self.generation.step_times) / sum(self.generation.step_times)

    def cells(self) -> list[str]:
        g = self.generation
        mbu = "unknown" if self.mbu is None else f"{100 * self.mbu:.1f}%"
        memory = "n/a" if g.peak_memory is None else f"{g.peak_memory / 2**30:.2f}"
        return [str(self.prompt), str(self.batch), f"{1000 * g.ttft:.1f}", f"{self.prompt / g.ttft:,.0f}",
                f"{self.prefill_flops_per_token:,.0f}", f"{1000 * g.tpot:.2f}", f"{self.decode_tok_per_sec:,.1f}",
                f"{self.decode_flops_per_token:,}", f"{self.bytes_per_step:,}",
                f"{self.bytes_per_step / g.tpot / 1e9:.2f}", mbu, memory]


HEADER = ["prompt", "batch", "TTFT ms", "prefill tok/s", "prefill FLOP/tok", "TPOT ms", "decode tok/s",
          "decode FLOP/tok", "bytes/step", "GB/s", "MBU", "peak GiB"]


def measure(model, engine: Engine, prompt_len: int, batch: int, tokens: int, peak: float | None) -> InferRow:
    """A warm-up call (kernels, allocator, compilation), then the timed one."""
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    time_generation(engine, prompt, batch, min(tokens, 4))
    generation = time_generation(engine, prompt, batch, tokens)
    # decode step k (1..tokens-1) feeds the token at position prompt_len + k - 1; the middle one stands for all
    middle = prompt_len + (tokens - 1) // 2
    step_bytes = decode_bytes_per_step(model, batch, middle)
    return InferRow(prompt_len, batch, generation, prefill_flops(config, prompt_len) / prompt_len,
                    decode_flops(config, middle), step_bytes,
                    None if peak is None else step_bytes / generation.tpot / peak)


def build_engine(depth: int, vocab: int, seq_len: int, device: torch.device, window_pattern: str = "SSSL",
                 compile_decode: bool = False) -> tuple[GPT, Engine]:
    """A random-init model in the device's compute dtype, and an engine that steps it (compiled or not)."""
    torch.manual_seed(0)
    try:
        config = model_config_for_depth(depth, vocab, seq_len, window_pattern=window_pattern)
        model = GPT.build(config, device=device, compute_dtype=compute_dtype(device.type)[0]).eval()
    except ValueError as e:  # a window pattern with letters other than S and L
        raise UserError(str(e)) from None
    # dynamic: the prompt length and the cache position change from call to call and step to step
    return model, Engine(torch.compile(model, dynamic=True) if compile_decode else model, NoStops(vocab))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows])


def positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text!r}: give positive whole numbers separated by commas, e.g. 1,8")
    return values


def bench_infer(args) -> None:
    batches, prompts = positive_ints(args.batch, "--batch"), positive_ints(args.prompt, "--prompt")
    for flag, value in (("--depth", args.depth), ("--vocab", args.vocab)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.tokens < 2:
        raise UserError(f"--tokens {args.tokens}: at least 2 (the first token comes from the prefill)")
    if max(prompts) + args.tokens > args.seq_len:
        raise UserError(f"--prompt {max(prompts)} + --tokens {args.tokens} exceed --seq-len {args.seq_len}, the "
                        f"model's context")
    device = torch.device(args.device or autodetect_device())
    model, engine = build_engine(args.depth, args.vocab, args.seq_len, device, args.window_pattern, args.compile)
    config = model.config
    peak, peak_note = bandwidth_peak(device)
    dtype = model.compute_dtype
    head_dim = config.n_embd // config.n_head
    params = sum(p.nelement() for p in model.parameters())
    print(f"infer  depth={args.depth} n_embd={config.n_embd} heads={config.n_head} kv_heads={config.n_kv_head} "
          f"head_dim={head_dim} vocab={args.vocab} (padded {padded_vocab_size(args.vocab)}) seq_len={args.seq_len} "
          f"windows={config.window_pattern} params={params:,} tokens={args.tokens} device={device} dtype={dtype} "
          f"compile={args.compile} threads={torch.get_num_threads()}")
    print(f"  read per decode step: {matmul_weight_bytes(model):,} bytes of matmul weights, and per sample "
          f"{embedding_row_bytes(model):,} bytes of embedding rows and the KV cache the windows reach")
    print(f"  KV cache per token: {kv_cache_bytes_per_token(config, dtype.itemsize):,} bytes stored "
          f"(2 x {config.n_layer} layers x {config.n_kv_head} kv heads x {head_dim} x {dtype.itemsize} bytes)")
    print(f"  {peak_note}")
    rows = [measure(model, engine, prompt, batch, args.tokens, peak) for prompt in prompts for batch in batches]
    print(markdown_table(HEADER, [row.cells() for row in rows]))
