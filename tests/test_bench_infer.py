"""python -m experiments.bench infer: the printed figures agree with the model they describe (the KV cache it
allocates, the training FLOPs of nanochat.gpt, the keys its attention reads), and bad flags are one-line errors."""

import pytest
import torch
import torch.nn.functional as F

from experiments import bench
from experiments.bench_infer import build_engine, measure
from nanochat import attention
from nanochat.attention import KVCache
from nanochat.gpt import GPT, model_config_for_depth
from nanochat.model_config import attended_keys, decode_flops, has_ve, prefill_flops

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEPTH, VOCAB, SEQ_LEN, TOKENS = 2, 512, 128, 5
PROMPTS, BATCHES = (8, 40), (1, 3)


def infer(capsys, *flags) -> str:
    assert bench.main(["infer", "--depth", str(DEPTH), "--vocab", str(VOCAB), "--seq-len", str(SEQ_LEN),
                       "--batch", ",".join(map(str, BATCHES)), "--prompt", ",".join(map(str, PROMPTS)),
                       "--tokens", str(TOKENS), "--device", "cpu", *flags]) == 0
    return capsys.readouterr().out


def table(out: str) -> list[dict[str, str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(header, row)) for row in rows[1:]]  # rows[0] is the --- line


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def middle(prompt: int) -> int:
    """The decode position the figures stand for (bench_infer.measure)."""
    return prompt + (TOKENS - 1) // 2


def model(window_pattern="SSSL") -> GPT:
    return GPT.build(model_config_for_depth(DEPTH, VOCAB, SEQ_LEN, window_pattern=window_pattern))


def test_one_row_per_prompt_and_batch_and_the_kv_bytes_the_cache_allocates(capsys):
    out = infer(capsys)
    rows = table(out)
    assert [(int(r["prompt"]), int(r["batch"])) for r in rows] == [(p, b) for p in PROMPTS for b in BATCHES]
    stored = int(out.split("KV cache per token: ")[1].split(" bytes")[0].replace(",", ""))
    config = model().config
    assert stored == 2 * config.n_layer * config.n_kv_head * (config.n_embd // config.n_head) * 4  # fp32 on CPU
    cache = KVCache.for_model(model(), 1, seq_len=1)
    assert stored == cache.k_cache.nbytes + cache.v_cache.nbytes
    for row in rows:  # no peak bandwidth on record for a CPU: no MBU is made up
        assert row["MBU"] == "unknown" and row["peak GiB"] == "n/a"
        tpot_s = number(row["TPOT ms"]) / 1000
        assert number(row["GB/s"]) == pytest.approx(number(row["bytes/step"]) / tpot_s / 1e9, rel=0.02, abs=0.01)


def test_flops_per_token_are_the_forward_third_of_the_training_flops(capsys):
    """With full-context windows, a token's forward FLOPs at position p are a third of estimate_flops() for a
    context of p + 1: 2 of its 6 per matmul weight and 4 of its 12 per attended key."""
    for row in table(infer(capsys, "--window-pattern", "L")):
        prompt = int(row["prompt"])

        def forward(position):
            config = model_config_for_depth(DEPTH, VOCAB, position + 1, window_pattern="L")
            with torch.device("meta"):
                training = GPT(config).estimate_flops()
            assert training % 3 == 0
            return training // 3

        assert int(number(row["decode FLOP/tok"])) == forward(middle(prompt))
        assert number(row["prefill FLOP/tok"]) == round(sum(forward(p) for p in range(prompt)) / prompt)


def test_bytes_per_step_are_the_weights_and_the_kv_cache_the_windows_reach(capsys):
    m = model()
    config, kv_dim = m.config, m.config.n_kv_head * (m.config.n_embd // m.config.n_head)
    ve_layers = sum(has_ve(i, config.n_layer) for i in range(config.n_layer))
    for row in table(infer(capsys)):
        batch, keys = int(row["batch"]), sum(attended_keys(config, middle(int(row["prompt"]))))
        per_sample = (config.n_embd + ve_layers * kv_dim) * 4 + 2 * kv_dim * keys * 4
        assert int(number(row["bytes/step"])) == m.num_matmul_params() * 4 + batch * per_sample


def test_attended_keys_are_the_keys_the_decode_step_reads(monkeypatch):
    """At a position past the short window, the attention of one decode step reads left + 1 keys in the
    windowed layers and every cached key in the others."""
    config = model_config_for_depth(2, VOCAB, 512)  # short window 128 on layer 0, the full context on layer 1
    m = GPT.build(config).eval()
    position = 200
    cache = KVCache.for_model(m, 1, seq_len=position + 1)
    with torch.no_grad():
        m(torch.randint(0, VOCAB, (1, position)), kv_cache=cache)
    read = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        read.append(k.size(2))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        m(torch.randint(0, VOCAB, (1, 1)), kv_cache=cache)
    assert read == attended_keys(config, position) == [129, 201]


def test_prefill_flops_sum_the_decode_flops_of_their_positions():
    config = model_config_for_depth(2, VOCAB, 512)  # a short window of 128: the ramp, then flat
    for n in (1, 100, 129, 300):
        assert prefill_flops(config, n) == sum(decode_flops(config, p) for p in range(n))


def test_mbu_is_the_bandwidth_used_over_the_peak():
    model_, engine = build_engine(1, VOCAB, SEQ_LEN, torch.device("cpu"))
    row = measure(model_, engine, 8, 2, 4, peak=1e9)
    assert row.mbu == pytest.approx(row.bytes_per_step / row.generation.tpot / 1e9)
    assert row.cells()[-2] == f"{100 * row.mbu:.1f}%"


@pytest.mark.parametrize("flags", [["--batch", "0"], ["--prompt", "8,x"], ["--tokens", "1"],
                                   ["--prompt", "100", "--tokens", "40"], ["--window-pattern", "SX"],
                                   ["--depth", "0"]])
def test_a_bad_flag_is_one_line_and_exit_2(capsys, flags):
    assert bench.main(["infer", "--seq-len", "128", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
