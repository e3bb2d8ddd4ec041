import math

import pytest

from nanochat.common import UserError
from nanochat.config import Config
from nanochat.depth import B_REF, plan

VOCAB = 32768


def gpu(**overrides):
    return Config(**overrides)  # the dataclass defaults are upstream's GPU values


def test_d12_is_the_reference():
    p = plan(gpu(depth=12), VOCAB, world_size=8)
    assert p.total_batch_size == B_REF and p.batch_lr_scale == 1.0
    assert math.isclose(p.weight_decay, 0.28)  # unscaled at the reference horizon and batch
    assert p.num_iterations == int(12 * p.params_scaling // B_REF) and p.horizon_from == "target_param_data_ratio"
    assert p.grad_accum_steps == B_REF // (32 * 2048 * 8)


def test_batch_grows_with_the_horizon_as_power_lines():
    small, big = plan(gpu(depth=12), VOCAB, 8), plan(gpu(depth=26), VOCAB, 8)
    predicted = B_REF * (12 * big.params_scaling / (12 * small.params_scaling)) ** 0.383
    assert big.total_batch_size == 2 ** round(math.log2(predicted)) > small.total_batch_size
    assert big.batch_lr_scale == pytest.approx((big.total_batch_size / B_REF) ** 0.5)
    expected_wd = 0.28 * math.sqrt(big.total_batch_size / B_REF) * small.params_scaling / big.params_scaling
    assert big.weight_decay == pytest.approx(expected_wd)


def test_horizon_precedence():
    flops = plan(gpu(depth=12, target_flops=1e18), VOCAB, 8)
    assert flops.horizon_from == "target_flops"
    assert flops.num_iterations == round(1e18 / (flops.flops_per_token * flops.total_batch_size))
    both = plan(gpu(depth=12, target_flops=1e18, num_iterations=7), VOCAB, 8)
    assert both.num_iterations == 7 and both.horizon_from == "num_iterations"


def test_overrides_and_bad_batches():
    p = plan(gpu(depth=12, total_batch_size=2**18), VOCAB, 4)
    assert p.total_batch_size == 2**18 and p.grad_accum_steps == 2**18 // (32 * 2048 * 4)
    with pytest.raises(UserError, match="not a multiple of device_batch_size"):
        plan(gpu(depth=12, total_batch_size=1000), VOCAB, 1)
    with pytest.raises(UserError, match="no training horizon"):
        plan(gpu(depth=12, target_param_data_ratio=-1), VOCAB, 1)


def test_describe_logs_every_derived_value():
    text = plan(gpu(depth=4), 8192, 1).describe()
    for key in ("total_batch_size", "num_iterations", "grad_accum_steps", "weight_decay", "n_embd", "n_head"):
        assert key in text
