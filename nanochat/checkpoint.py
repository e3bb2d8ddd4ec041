"""Checkpoints. `weights_sha256` is the fingerprint summary.json carries (CONTRACT.md): equal weights, equal hash,
whatever device or dtype they were trained in."""

import hashlib

import torch


def weights_sha256(state_dict: dict) -> str:
    """sha256 over the entries in sorted key order, feeding each key (utf-8) then its tensor as contiguous
    float32 bytes on the CPU."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode("utf-8"))
        tensor = state_dict[key].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
