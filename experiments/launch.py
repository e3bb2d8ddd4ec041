"""python -m experiments.launch [overrides]: run the pipeline (no arguments: the embedded default on this machine).

Exit codes: 0 done, 2 a user error (printed as one line), 1 anything else.
"""

import sys

from nanochat.common import UserError


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        from experiments.config import load_config
        from experiments.pipeline import run_pipeline

        run_pipeline(load_config(overrides), overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
