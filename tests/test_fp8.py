"""fp8 is off while evaluating and sampling, on again after: each Float8Linear is swapped for a plain Linear on the
same weight and swapped back. On the CPU the fp8 layer is a stand-in of torchao's class (same name, an nn.Linear
whose output differs visibly); tests/test_gpu.py runs torchao's own on SM89+."""

import torch
import torch.nn.functional as F

from nanochat.fp8 import FP8_LINEAR, fp8_off
from nanochat.gpt import GPT, Linear, model_config_for_depth


class Float8Linear(torch.nn.Linear):
    def forward(self, x):  # a coarse stand-in for fp8 rounding: anything that is not the bf16/fp32 product
        return F.linear(x, self.weight.to(x.dtype)).round()


def fp8_model():
    torch.manual_seed(0)
    model = GPT.build(model_config_for_depth(2, 256, 32)).eval()
    with torch.no_grad():  # as after some training: the output projections start at zero, which hides the MLP
        for p in model.parameters():
            p.normal_(0, 0.5)
    converted = []
    for name, module in list(model.named_modules()):
        if name.endswith("mlp.c_fc"):
            fp8 = Float8Linear(module.in_features, module.out_features, bias=False)
            fp8.weight = module.weight
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, fp8)
            converted.append(name)
    return model, converted


def test_evaluation_runs_without_fp8_on_the_same_weights_and_fp8_comes_back():
    assert Float8Linear.__name__ == FP8_LINEAR
    model, converted = fp8_model()
    plain, _ = fp8_model()
    for name in converted:  # the same model without fp8: what evaluation must compute
        parent, _, attr = name.rpartition(".")
        linear = Linear(1, 1, bias=False)
        linear.weight = plain.get_submodule(name).weight
        setattr(plain.get_submodule(parent), attr, linear)
    x = torch.randint(0, 256, (2, 32))
    weights = {name: model.get_submodule(name).weight for name in converted}
    with torch.no_grad():
        with_fp8 = model(x)
        with fp8_off(model):
            assert not any(type(m).__name__ == FP8_LINEAR for m in model.modules())
            assert all(model.get_submodule(n).weight is w for n, w in weights.items())  # shared, not copied
            evaluated = model(x)
        after = model(x)
    assert converted and torch.equal(evaluated, plain(x)) and not torch.equal(evaluated, with_fp8)
    assert torch.equal(after, with_fp8)
    assert all(type(model.get_submodule(n)) is Float8Linear for n in converted)


def test_fp8_comes_back_when_the_evaluation_fails():
    model, converted = fp8_model()
    try:
        with fp8_off(model):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert all(type(model.get_submodule(n)) is Float8Linear for n in converted)
