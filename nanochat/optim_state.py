"""The optimizer's state as a checkpoint keeps it: per parameter name, so that any number of ranks can load it.

Each rank writes only what it holds (no gather), as one dict:

    {"format": FORMAT,
     "groups": [{hyperparameters of each param group: kind, name, lr, initial_lr, betas, momentum, ...}],
     "state":  {parameter name: {key: {"shape": full shape, "offset": o, "values": 1-D tensor}}}}

`values` are the elements [o, o + len) of the parameter's whole `key` state flattened row-major; `shape` is that
whole state's shape. Keys: AdamW's step (shape ()), exp_avg and exp_avg_sq (the parameter's shape; a sharded one
gives each rank its flat slice), Muon's momentum_buffer (the matrix's shape) and second_momentum_buffer (one per
row or column), each Muon matrix from the one rank that updates it. What every rank holds whole (steps, the
small AdamW parameters) is in every rank's dict, so a rank resuming on the same world size reads its own file
only. On another world size each rank assembles the slices it now owns from the overlapping pieces of the old
ranks' files, through mmap: it holds its own share, and reads the pages of the slices it copies (the kernel may
map more of the old files around them: clean page cache, see BENCHMARKS.md's figures), never the whole state.

Checkpoints written before this format hold torch's optimizer state_dict of each rank's shard: `restore` still
loads one on the world size that wrote it.
"""

import torch

FORMAT = "per-parameter/1"
GROUP_KEYS_NOT_SAVED = ("params", "fused")  # the parameters themselves; fused is a property of the device


def pieces(optimizer, names: dict) -> dict:
    """This rank's state in the per-parameter format, as views of the optimizer's own tensors (no copy).
    `names`: {parameter: name} (model.named_parameters()). The views of a Muon group's stacked buffer cost no
    more on disk than the buffer: torch.save writes each storage once per file, however many views use it (this
    rank's zero padding matrix, when it has one, comes along)."""
    state = {}
    for p, key, shape, offset, flat in optimizer.owned_state():
        state.setdefault(names[p], {})[key] = {"shape": list(shape), "offset": offset, "values": flat.detach()}
    groups = [{k: v for k, v in group.items() if k not in GROUP_KEYS_NOT_SAVED} for group in optimizer.param_groups]
    return {"format": FORMAT, "groups": groups, "state": state}


def is_per_parameter(saved) -> bool:
    return isinstance(saved, dict) and saved.get("format") == FORMAT


def restore(optimizer, names: dict, sources: list) -> int:
    """Load the state this rank owns from `sources`: the saved dicts of the ranks that wrote the checkpoint, this
    rank's own first (it is preferred where ranks hold the same piece). Returns the bytes copied. An older
    checkpoint's torch state_dict (sources == [it]) is handed to optimizer.load_state_dict. Raises ValueError
    when the saved state does not fit this optimizer (other groups or shapes, missing slices)."""
    if not is_per_parameter(sources[0]):
        optimizer.load_state_dict(sources[0])
        return 0
    _restore_groups(optimizer, sources[0]["groups"])
    copied = 0
    for p, key, shape, offset, flat in optimizer.owned_state(create=True):
        saved = [source["state"].get(names[p], {}).get(key) for source in sources]
        saved = [piece for piece in saved if piece is not None]
        if not saved:
            continue  # no state saved for it: the zeros just made are what a fresh optimizer starts from
        if any(tuple(piece["shape"]) != shape for piece in saved):
            raise ValueError(f"optimizer state {names[p]}.{key} was saved with shape {tuple(saved[0]['shape'])}, "
                             f"this model's is {shape}")
        covered = _copy_overlaps(flat, offset, saved)
        if covered != flat.numel():
            raise ValueError(f"optimizer state {names[p]}.{key}: the checkpoint holds {covered:,} of the "
                             f"{flat.numel():,} elements [{offset:,}, {offset + flat.numel():,}) this rank needs")
        copied += flat.numel() * flat.element_size()
    return copied


def _restore_groups(optimizer, saved: list[dict]) -> None:
    ours = [group.get("name", group["kind"]) for group in optimizer.param_groups]
    theirs = [group.get("name", group["kind"]) for group in saved]
    if ours != theirs:
        raise ValueError(f"the optimizer's parameter groups differ from the saved ones ({ours} vs {theirs})")
    for group, values in zip(optimizer.param_groups, saved):
        group.update(values)


def _copy_overlaps(flat: torch.Tensor, offset: int, saved: list[dict]) -> int:
    """Copy into flat (the elements [offset, offset + len) of a whole state) the parts of the saved pieces that
    overlap it; returns how many elements were covered. Pieces with the same range are copies of one another
    (replicated state): the first is used. Distinct ranges are disjoint by construction, so a coverage equal to
    the length means every element came from exactly one piece."""
    end, covered, seen = offset + flat.numel(), 0, set()
    for piece in saved:
        lo = piece["offset"]
        hi = lo + piece["values"].numel()
        a, b = max(lo, offset), min(hi, end)
        if a >= b or (lo, hi) in seen:
            continue
        seen.add((lo, hi))
        flat[a - offset:b - offset].copy_(piece["values"][a - lo:b - lo])
        covered += b - a
    return covered


def full_state(sources: list) -> dict:
    """{name: {key: whole tensor}} assembled from every rank's saved dict (a test's or a person's view of the
    state; a rank that trains never needs it whole)."""
    by_key: dict = {}
    for source in sources:
        for name, keys in source["state"].items():
            for key, piece in keys.items():
                by_key.setdefault((name, key), []).append(piece)
    whole = {}
    for (name, key), saved in by_key.items():
        shape = tuple(saved[0]["shape"])
        tensor = torch.empty(shape, dtype=saved[0]["values"].dtype)
        covered = _copy_overlaps(tensor.view(-1), 0, saved)
        if covered != tensor.numel():
            raise ValueError(f"optimizer state {name}.{key}: the saved pieces cover {covered:,} of {tensor.numel():,}")
        whole.setdefault(name, {})[key] = tensor
    return whole
