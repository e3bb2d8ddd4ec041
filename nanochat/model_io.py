"""Load a trained model from any checkpoint a user points at, and export one in upstream nanochat's format.

Accepted: a stage folder (<run>/base_train), its checkpoints/ folder, one step_NNNNNN/ folder, or a folder
written by upstream nanochat (model_NNNNNN.pt + meta_NNNNNN.json, the newest step is taken).

    python -m nanochat.model_io export RUN/base_train OUT_DIR      # upstream's layout, fp32 masters as stored
    python -m nanochat.model_io export RUN/base_train OUT_DIR --dtype bf16   # half the size, for inference only
"""

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

from nanochat.checkpoint import complete_checkpoints, is_complete
from nanochat.common import UserError, atomic_file, atomic_write_text, run_cli
from nanochat.gpt import GPT, GPTConfig
from nanochat.storage import verify_file
from nanochat.tokenizer import Tokenizer

_UPSTREAM_MODEL = re.compile(r"model_(\d+)\.pt$")


def resolve(path) -> tuple[Path, Path, int]:
    """(weights file, meta.json, step) of the newest complete checkpoint at or under `path`."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if is_complete(path):
        return path / "model.pt", path / "meta.json", int(path.name.split("_")[-1])
    ours = complete_checkpoints(path)
    if ours:
        return ours[-1] / "model.pt", ours[-1] / "meta.json", int(ours[-1].name.split("_")[-1])
    upstream = sorted((int(m.group(1)), p) for p in path.glob("model_*.pt") if (m := _UPSTREAM_MODEL.search(p.name)))
    if upstream:
        step, weights = upstream[-1]
        return weights, path / f"meta_{step:06d}.json", step
    raise UserError(f"no complete checkpoint at {path} (expected a stage folder, step_NNNNNN/ or upstream's "
                    f"model_NNNNNN.pt + meta_NNNNNN.json)")


def find_chat_model(run: str | None = None, stage: str | None = None, checkpoint: str | None = None,
                    runs_root=None) -> tuple[Path, Path, bool]:
    """(checkpoint path, tokenizer folder, whether it is a chat model) for the chat commands. --checkpoint wins; otherwise the run (default:
    the newest under runs_root) and its stage (default: rl, else sft, else base). An upstream checkpoint uses
    $NANOCHAT_BASE_DIR/tokenizer, upstream's place for it."""
    from nanochat.common import get_base_dir
    from nanochat.runs import Run, find_run, resolve_runs_root
    from nanochat.stage_table import BY_NAME, CHAT_STAGES

    if stage is not None and stage not in CHAT_STAGES:
        raise UserError(f"--stage {stage!r}: use one of {', '.join(CHAT_STAGES)}")
    if checkpoint:
        path = Path(checkpoint).resolve()
        # ours: <run>/<stage>[/checkpoints[/step_N]]; upstream: chatsft_checkpoints/, chatrl_checkpoints/, ...
        is_chat = any(part.startswith("chat") or (part in BY_NAME and BY_NAME[part].makes == "chat")
                      for part in path.parts)
        for folder in path.parents:
            if Tokenizer.exists(Run(folder).tokenizer_dir):
                return path, Run(folder).tokenizer_dir, is_chat
        return path, get_base_dir() / "tokenizer", is_chat
    chosen = find_run(run or None, runs_root)
    if chosen is None or not chosen.root.is_dir():
        raise UserError(f"no run {'named ' + repr(run) if run else 'at all'} under {resolve_runs_root(runs_root)}; "
                        f"train one first (python -m experiments.launch) or pass --checkpoint DIR")
    for name in ([stage] if stage else list(CHAT_STAGES)):
        folder = chosen.checkpoints_dir(CHAT_STAGES[name])
        if complete_checkpoints(folder):
            return folder, chosen.tokenizer_dir, BY_NAME[CHAT_STAGES[name]].makes == "chat"
    wanted = f"stage {stage!r}" if stage else f"any of {', '.join(CHAT_STAGES)}"
    raise UserError(f"run {chosen.root.name} has no finished checkpoint for {wanted}")


def model_config(meta: dict) -> GPTConfig:
    """The GPTConfig in a meta file; upstream checkpoints from before sliding windows trained with full context."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    fields = {k: v for k, v in meta["model_config"].items() if k in known}
    fields.setdefault("window_pattern", "L")
    return GPTConfig(**fields)


def load_model(path, device="cpu", compute_dtype=None) -> tuple[GPT, dict]:
    """The model of a checkpoint: ours verified against its manifest, any (upstream's too) read weights-only and
    checked against the shapes and kinds of tensor its meta describes; a failure is one line."""
    weights, meta_path, step = resolve(path)
    try:
        meta = json.loads(meta_path.read_text())
        config = model_config(meta)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {weights}: cannot read {meta_path.name} ({type(exc).__name__}: {exc})") from None
    manifest = weights.parent / "manifest_rank0.json"
    if manifest.is_file():
        try:
            problem = verify_file(weights, json.loads(manifest.read_text())[weights.name])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = f"its {manifest.name} is damaged ({type(exc).__name__})"
        if problem:
            raise UserError(f"checkpoint {weights}: {problem}")
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001  damaged or not weights: one line either way
        raise UserError(f"cannot load {weights} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a torch.compile'd model
    _add_missing_scalars(state, config, weights)
    model = GPT.build(config, device=device, compute_dtype=compute_dtype)
    expected = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in state.items() if k in expected and (
        v.shape != expected[k].shape or v.is_floating_point() != expected[k].is_floating_point())]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        raise UserError(f"{weights} does not hold the model its {meta_path.name} describes: "
                        + "; ".join(filter(None, [f"wrong shape or kind: {', '.join(wrong[:3])}" if wrong else "",
                                                  f"missing: {', '.join(missing[:3])}" if missing else "",
                                                  f"unexpected: {', '.join(unexpected[:3])}" if unexpected else ""])))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, {**meta, "step": step, "path": str(weights)}


def _add_missing_scalars(state: dict, config: GPTConfig, weights: Path) -> None:
    """Upstream checkpoints from before the per-layer residual scalars lack them: the values that make those
    layers what they were (residual scale 1, no x0 mix), as upstream's loader fills in."""
    for key, value in (("resid_lambdas", 1.0), ("x0_lambdas", 0.0)):
        if key not in state:
            state[key] = torch.full((config.n_layer,), value)
            print(f"{weights}: no {key} (an older upstream checkpoint): set to {value:g} in every layer",
                  file=sys.stderr)


EXPORT_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: as stored (our checkpoints keep fp32 masters)


def export_upstream(path, out_dir, dtype: torch.dtype | None = None) -> Path:
    """Weights only, as upstream's model_NNNNNN.pt + meta_NNNNNN.json: as stored (fp32, as upstream saves its
    masters), or floats cast to `dtype`."""
    weights, meta_path, step = resolve(path)
    meta = json.loads(meta_path.read_text())
    state = torch.load(weights, map_location="cpu", weights_only=True)
    out = Path(out_dir)
    with atomic_file(out / f"model_{step:06d}.pt") as f:
        torch.save({k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in state.items()}, f)
    atomic_write_text(out / f"meta_{step:06d}.json", json.dumps(
        {"step": step, "model_config": meta["model_config"], "source": str(weights)}, indent=2))
    return out / f"model_{step:06d}.pt"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat.model_io")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the weights in upstream nanochat's layout")
    export.add_argument("source")
    export.add_argument("out_dir")
    export.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="fp32",
                        help="fp32: as trained (default); bf16: half the size, for inference")
    args = parser.parse_args(argv)
    return run_cli(lambda: print(export_upstream(args.source, args.out_dir, EXPORT_DTYPES[args.dtype])))


if __name__ == "__main__":
    sys.exit(main())
