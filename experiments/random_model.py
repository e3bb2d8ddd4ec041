"""Random-weight models for benchmarks and checks, which need no trained checkpoint and no tokenizer."""


def every_path_active(model):
    """Give a freshly initialized GPT's zero-initialized output projections, gates and smear random values, so
    that attention, value embeddings and smear all change the output (and every weight gets a gradient)."""
    import torch

    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.normal_(0, 0.5)
        model.smear_lambda.fill_(0.7)
        model.smear_gate.weight.normal_(0, 0.5)
        model.lm_head.weight.normal_(0, 0.05)
    return model.eval()


class NoStops:
    """The engine's tokenizer surface with the stop and tool tokens out of the model's reach: a random model
    then never stops early, so every timed generation runs to its token budget."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode_special(self, name: str) -> int:
        return self.vocab_size + 1

    def get_bos_token_id(self) -> int:
        return self.vocab_size + 2

    def decode(self, ids) -> str:
        return ""
