"""fp8 training: torchao's Float8Linear on the block matrices (SM89+: Ada, Hopper, Blackwell), and evaluation
without it.

Evaluation and sampling run in bf16, as upstream's base_train does: fp8's dynamic scaling is a training-time
trade of precision for speed, and a val bpb or CORE measured through it would not be comparable with a bf16 run's.
`fp8_off` swaps each Float8Linear for a plain Linear sharing the same weight Parameter (nothing is copied), and
swaps them back after.
"""

from contextlib import contextmanager

import torch

from nanochat.common import UserError
from nanochat.gpt import Linear

FP8_LINEAR = "Float8Linear"  # torchao's class name (matched by name: torchao is optional and absent on CPU)


def enable_fp8(model, device, recipe: str) -> None:
    """Convert the eligible Linear layers in place, before the optimizer and compile see the modules (the weight
    Parameters are kept, so the optimizer's groups are unchanged)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError("fp8=true needs an SM89+ GPU (H100, L40S, RTX 4090); this device has none")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError("fp8=true needs torchao: pip install -e '.[gpu]'") from None

    def eligible(module, fqn: str) -> bool:  # fp8 GEMMs want dims divisible by 16; tiny ones gain nothing
        return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
                and module.out_features % 16 == 0 and min(module.in_features, module.out_features) >= 128)

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=eligible)


@contextmanager
def fp8_off(model):
    """Within: `model` computes without fp8 (each Float8Linear replaced by a Linear on the same weight)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ == FP8_LINEAR:
            parent_name, _, attr = name.rpartition(".")
            plain = Linear(module.in_features, module.out_features, bias=False, device="meta")  # GPT has no biases
            plain.weight = module.weight
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, plain)
            swapped.append((parent, attr, module))
    try:
        yield model
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
