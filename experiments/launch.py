"""python -m experiments.launch [overrides]: run the pipeline (no arguments: the embedded default on this machine).

Exit codes: 0 done, 2 a user error (printed as one line), 1 anything else.
`+resume_changed=true` (not a config key) resumes a run folder whose saved config differs in result-changing keys.
"""

import sys

from nanochat.common import UserError


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        from experiments.config import load_config
        from experiments.pipeline import run_pipeline
        from experiments.resume_guard import split_resume_flag

        schema_overrides, resume_changed = split_resume_flag(overrides)
        # the full list goes on, flag included, so that local child ranks resume the same way
        run_pipeline(load_config(schema_overrides), overrides, resume_changed=resume_changed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
