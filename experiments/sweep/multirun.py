"""`-m`/`--multirun`: a sweep over any keys, every combination of their values, in Hydra's multirun syntax
(key=a,b or choice(a,b) or range(start,stop[,step])). It is parsed here into the overrides every run shares and
the swept keys (the axes); plan.py turns those into runs like a miniseries' depths or an isoflop's budgets."""

from nanochat.common import UserError

# config groups: each composes many keys at once (and +cluster where the jobs run), so one sweep picks one
GROUPS = ("preset", "experiment", "cluster")
# what makes the tokenizer, which every run of a sweep shares (trained once, by the sweep's tokenizer run)
TOKENIZER_KEYS = ("dataset", "tokenizer", "tok_train", "tok_eval")
# the sweep's own keys: the planner sets them for each run, or they hold for the sweep as a whole
SWEEP_KEYS = ("run_name", "runs_root", "stages", "sweep", "depths", "flops_budgets", "sweep_parallelism",
              "sweep_resources")


def parse_multirun(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The overrides every run shares, and each swept key's values as override text, in the order typed."""
    from hydra.core.override_parser.types import ValueType

    discrete = (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)
    fixed, axes, keys = [], {}, []
    for text in overrides:
        override = parse(text)
        keys.append(override.key_or_group)
        if not override.is_sweep_override():
            fixed.append(text)
            continue
        check_axis(override.key_or_group, text)
        if override.value_type not in discrete:  # interval(): for an optimizing sweeper, which this is not
            raise UserError(f"{text}: -m sweeps a list of values: key=a,b, choice(a,b) or range(start,stop,step)")
        axes[override.key_or_group] = list(override.sweep_string_iterator())
    twice = sorted({k for k in keys if keys.count(k) > 1 and k in axes})
    if twice:
        raise UserError(f"{twice[0]} is both swept and set (or swept twice): give it once")
    if not axes:
        raise UserError("-m sweeps keys given as key=a,b (or choice(a,b), range(start,stop)), and there is none: "
                        "drop -m for one run")
    return fixed, axes


def parse(text: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides([text])[0]
    except HydraException as exc:  # the first line says what; the rest is a link to Hydra's grammar
        raise UserError(f"{text}: {str(exc).strip().splitlines()[0]}") from None


def check_axis(key: str, text: str) -> None:
    """A key the runs of one sweep cannot differ in is refused in one line, saying why."""
    first = key.split(".")[0]
    if key in GROUPS:
        raise UserError(f"{text}: -m sweeps keys, not the config groups preset, +experiment, +cluster: run one "
                        f"sweep per choice (run_name=...)")
    if first == "cluster":
        raise UserError(f"{text}: the cluster.* keys are the jobs' resources, which the runs of an array share; "
                        f"resources by depth: sweep_resources=[...]")
    if first in TOKENIZER_KEYS:
        raise UserError(f"{text}: the runs of a sweep share one tokenizer, made from dataset, tokenizer, "
                        f"tok_train.* and tok_eval.*: run one sweep per value (run_name=...)")
    if key in SWEEP_KEYS:
        raise UserError(f"{text}: {key} is the sweep's own, the same for all its runs "
                        f"({', '.join(SWEEP_KEYS)})")


def axis_overrides(axes: dict[str, list[str]]) -> list[str]:
    """The axes as the overrides that give them (`range()` written out), for the manifest's record."""
    return [f"{key}={','.join(values)}" for key, values in axes.items()]
