"""Which model a chat command (chat_cli, chat_web) talks with, chosen with the words the rest of the project uses.

As flags (--run, --runs-root, --stage, --checkpoint) or as the launcher's and experiments.chat's words: a bare
RUN, `run_name=RUN` and `runs_root=DIR` as `python -m experiments.launch` takes them, `stage=` and
`checkpoint=`. So `python -m nanochat.chat_cli runs_root=/scratch/me/runs run_name=try1 stage=sft` finds the run
the launcher wrote with the same words.
"""

from __future__ import annotations

import argparse

from nanochat.common import UserError

# a launcher-style key -> the flag's dest
KEYS = {"run_name": "run", "runs_root": "runs_root", "stage": "stage", "checkpoint": "checkpoint"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags, and the words (read by apply_words; parse with parse_intermixed_args: words and flags mix)."""
    parser.add_argument("words", nargs="*", metavar="RUN|KEY=VALUE",
                        help=f"a run, or the launcher's keys: {', '.join(k + '=' for k in KEYS)}")
    parser.add_argument("--run", help="run name or folder (default: the newest run)")
    parser.add_argument("--runs-root", metavar="DIR", help="the folder --run NAME (and the newest run) is looked "
                        "up in, the launcher's runs_root=, e.g. a cluster profile's (default: $NANOCHAT_BASE_DIR/runs)")
    parser.add_argument("--stage", help="base, sft or rl (default: rl, else sft, else base)")
    parser.add_argument("--checkpoint", help="a checkpoint folder (ours or upstream nanochat's)")


def apply_words(args: argparse.Namespace) -> argparse.Namespace:
    """Set the flags' values from the RUN and KEY=VALUE words; a word that is not one, or says again what a flag
    already said otherwise, is a UserError."""
    for word in args.words:
        key, is_key, value = word.partition("=")
        dest, value = (KEYS.get(key), value) if is_key else ("run", word)
        if dest is None:
            raise UserError(f"{word}: not a way to choose the model; use RUN or "
                            f"{', '.join(k + '=...' for k in KEYS)} (a cluster profile's runs root: runs_root=DIR)")
        if not value:
            raise UserError(f"{word}: no value")
        if getattr(args, dest) not in (None, value):
            raise UserError(f"{word}: the {dest.replace('_', ' ')} is already {getattr(args, dest)!r}")
        setattr(args, dest, value)
    return args
