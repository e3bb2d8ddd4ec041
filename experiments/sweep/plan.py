"""A sweep's plan: its keys checked, its axes (a miniseries' depths, an isoflop's budgets x depths, -m's keys)
expanded into runs, each run's config composed and its horizon planned by the depth dial, and the runs grouped by
the resources their depth needs."""

import dataclasses
import itertools
import re
from pathlib import Path

from nanochat.common import UserError
from nanochat.runs import Run, Sweep

from experiments.cluster import SweepResources

KINDS = ("miniseries", "isoflop")  # sweep=; the third kind, "multirun", is -m's (experiments/sweep/multirun.py)
CLEARED = ["sweep=null", "depths=[]", "flops_budgets=[]"]  # what makes a run of the sweep an ordinary run


@dataclasses.dataclass
class SweepRun:
    name: str
    depth: int
    group: int  # index into the resource groups; a group is one job array
    overrides: list[str]  # appended to the sweep's command line, they make this run's config
    values: dict  # the run's value of each axis, for the manifest
    cfg: object = None  # composed from those, as the job composes it
    plan: dict = dataclasses.field(default_factory=dict)  # what the depth dial makes of it, for the manifest
    job: dict | None = None  # the job submitted now, for the manifest


@dataclasses.dataclass
class SweepPlan:
    folder: Path
    kind: str  # miniseries, isoflop or multirun
    axes: dict[str, list]
    groups: list[SweepResources]
    tokenizer: Path  # the shared tokenizer's folder (made by the sweep's tokenizer run unless given)
    runs: list[SweepRun]


def plan_sweep(cfg, schema_overrides: list[str], multirun: dict | None) -> SweepPlan:
    """The whole plan, checked, with nothing written or submitted (launch_sweep, and -m --info / --cfg job)."""
    check(cfg, multirun)
    if cfg.cluster and not cfg.cluster.partition:
        raise UserError(f"cluster profile {cfg.cluster.name!r} has no partition; set cluster.partition=NAME")
    folder, axes = sweep_folder(cfg, multirun), sweep_axes(cfg, multirun)
    tokenizer = Path(cfg.tokenizer).resolve() if cfg.tokenizer else Sweep(folder).tokenizer_run.tokenizer_dir
    groups = resource_groups(cfg, axes)
    runs = expand(cfg, folder, tokenizer, groups, axes)
    plan_runs(runs, cfg, schema_overrides, groups, vocab_size(cfg, tokenizer))
    return SweepPlan(folder, sweep_kind(cfg, multirun), axes, groups, tokenizer, runs)


def is_done(run: Run, stages: list[str]) -> bool:
    return all(run.is_done(s) for s in stages)


def sweep_kind(cfg, multirun: dict | None) -> str:
    return "multirun" if multirun else cfg.sweep


def check(cfg, multirun: dict | None) -> None:
    """The sweep keys, in one line each when wrong. `multirun`: -m's axes, if any."""
    if multirun and cfg.sweep is not None:  # nested, an isoflop's analysis would mix its curves' runs
        raise UserError(f"-m does not nest in sweep={cfg.sweep} (+experiment={cfg.sweep}), a sweep of its own: run "
                        f"one {cfg.sweep} per value instead, e.g. run_name={cfg.sweep}-lr2 matrix_lr=0.02")
    if cfg.sweep is None and (cfg.depths or cfg.flops_budgets):
        raise UserError("depths= and flops_budgets= are sweep keys: add +experiment=miniseries or "
                        "+experiment=isoflop (or sweep=miniseries|isoflop)")
    if cfg.sweep is not None:
        check_kind(cfg)
    if cfg.sweep_parallelism < 0:
        raise UserError(f"sweep_parallelism={cfg.sweep_parallelism} must be >= 0 (0: no limit)")


def check_kind(cfg) -> None:
    if cfg.sweep not in KINDS:
        raise UserError(f"unknown sweep={cfg.sweep!r}; valid: {', '.join(KINDS)}")
    if not cfg.depths:
        raise UserError(f"sweep={cfg.sweep} needs depths=[...], at least one")
    if min(cfg.depths) < 1 or len(set(cfg.depths)) != len(cfg.depths):
        raise UserError(f"depths={cfg.depths} must be distinct and >= 1")
    if cfg.sweep == "isoflop":
        if not cfg.flops_budgets:
            raise UserError("sweep=isoflop needs flops_budgets=[...], at least one")
        if min(cfg.flops_budgets) <= 0:
            raise UserError(f"flops_budgets={cfg.flops_budgets} must be > 0")
        if cfg.num_iterations > 0:
            raise UserError(f"num_iterations={cfg.num_iterations} would override each run's budget; "
                            f"set num_iterations=-1")
    else:
        if cfg.flops_budgets:
            raise UserError("flops_budgets= is for sweep=isoflop; a miniseries trains each depth at "
                            "target_param_data_ratio")
        if cfg.num_iterations > 0 or cfg.target_flops > 0:
            raise UserError("a miniseries trains each depth at its compute-optimal horizon "
                            "(target_param_data_ratio); set num_iterations=-1 target_flops=-1")


def sweep_folder(cfg, multirun: dict | None) -> Path:
    """run_name, else the experiment's name; a -m sweep's: <experiment_name>-multirun, beside (never in) the
    folders of its experiment's single runs (<experiment_name>-d<depth>) and named sweeps."""
    from experiments.config import runs_root

    default = f"{cfg.experiment_name}-multirun" if multirun else cfg.experiment_name
    return runs_root(cfg).resolve() / (cfg.run_name or default)


def sweep_axes(cfg, multirun: dict | None) -> dict[str, list]:
    """What the sweep varies, the outermost axis first: -m's keys as typed; an isoflop's budgets, smallest first
    (so the first isoflop curves are complete early), then its depths; a miniseries' depths."""
    if multirun:
        return multirun
    budgets = {"target_flops": sorted(cfg.flops_budgets)} if cfg.sweep == "isoflop" else {}
    return {**budgets, "depth": sorted(cfg.depths)}


def run_depth(cfg, values: dict) -> int:
    """A run's depth, which picks its resource group: its value on the depth axis, else the sweep's depth."""
    depth = values.get("depth", cfg.depth)
    try:
        return int(depth)
    except ValueError:  # -m's values are override text
        raise UserError(f"depth={depth} is not a whole number") from None


def resource_groups(cfg, axes: dict[str, list]) -> list[SweepResources]:
    """One group per sweep_resources entry, by max_depth; none: one group with the profile's resources."""
    depths = [run_depth(cfg, {"depth": d}) for d in axes.get("depth", [cfg.depth])]
    groups = sorted(cfg.sweep_resources, key=lambda r: r.max_depth)
    if not groups:
        return [SweepResources(max_depth=max(depths))]
    too_deep = sorted({d for d in depths if d > groups[-1].max_depth})
    if too_deep:
        raise UserError(f"depth(s) {too_deep} are above every sweep_resources max_depth "
                        f"({groups[-1].max_depth}); add an entry for them")
    return groups


def budget_label(budget: float) -> str:
    """1e18, 2.15e18: upstream's tags."""
    mantissa, _, exponent = f"{budget:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def value_label(key: str, value) -> str:
    """One value's part of a run's name: d<depth>, a budget as upstream tags it (1e18), else the key's last part
    and the value in the characters a plain name keeps (sft.init_lr_frac=0.5: init_lr_frac0.5; [1,2]: 1_2)."""
    if key == "depth":
        return f"d{value}"
    if isinstance(value, float):  # an isoflop's budgets (-m's values are override text)
        return budget_label(value)
    return key.rsplit(".", 1)[-1] + re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(value)).strip("_")


def override(key: str, value) -> str:
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def expand(cfg, folder: Path, tokenizer: Path, groups: list[SweepResources], axes: dict[str, list]) -> list[SweepRun]:
    """Every combination of the axes' values into a run, the first axis outermost (submission order), named
    <sweep>-<value label>-..."""
    stages = run_stages(cfg)
    runs = []
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        depth = run_depth(cfg, values)
        name = "-".join([folder.name, *(value_label(key, value) for key, value in values.items())])
        group = next(i for i, g in enumerate(groups) if depth <= g.max_depth)
        overrides = [f"run_name={name}", f"runs_root={folder}", f"tokenizer={tokenizer}",
                     f"stages=[{','.join(stages)}]", *CLEARED]
        if groups[group].device_batch_size:
            overrides.append(f"device_batch_size={groups[group].device_batch_size}")
        # last, so that a swept device_batch_size is not overridden by its group's
        overrides += [override(key, value) for key, value in values.items()]
        runs.append(SweepRun(name, depth, group, overrides, values))
    check_names(runs)
    return runs


def check_names(runs: list[SweepRun]) -> None:
    """Each run's folder is its name: two runs with one name would share one folder."""
    first = {}
    for run in runs:
        other = first.setdefault(run.name, run)
        if other is not run:
            given = [" ".join(override(k, v) for k, v in r.values.items()) for r in (other, run)]
            raise UserError(f"{given[0]} and {given[1]} give runs the same name {run.name}; make the values differ "
                            f"in what a name keeps (a budget: its first 3 significant digits; any other value: "
                            f"letters, digits, -_.+)")


def run_stages(cfg) -> list[str]:
    from nanochat.stage_table import CPU_JOB_STAGES

    stages = [s for s in cfg.stages if s not in CPU_JOB_STAGES]
    if not stages:
        raise UserError(f"stages={cfg.stages} leave nothing for the runs of a sweep; add base_train")
    return stages


def tokenizer_stages(cfg) -> list[str]:
    return ["tok_train"] + (["tok_eval"] if "tok_eval" in cfg.stages else [])


def group_cluster(cluster, res: SweepResources):
    changes = {k: getattr(res, k) for k in ("nodes", "gpus_per_node", "time_min") if getattr(res, k) is not None}
    return dataclasses.replace(cluster, **changes)


def plan_runs(runs: list[SweepRun], cfg, schema_overrides: list[str], groups, vocab_size: int) -> None:
    """Compose each run's config as its job will, and plan it with the depth dial: a budget too small for a depth,
    or a batch that does not divide over the group's GPUs, is a user error here."""
    from nanochat import depth as depth_dial

    from experiments.config import load_config

    for run in runs:
        if cfg.cluster:
            gc = group_cluster(cfg.cluster, groups[run.group])
            world = gc.nodes * gc.ranks_per_node
        else:
            world = cfg.nproc
        try:  # a swept value that is not a valid one fails here, naming its run
            run.cfg = load_config(schema_overrides + run.overrides)
            plan = depth_dial.plan(run.cfg, vocab_size, world)
        except UserError as exc:
            raise UserError(f"run {run.name}: {exc}") from None
        run.plan = {"steps": plan.num_iterations, "total_batch_size": plan.total_batch_size,
                    "tokens": plan.total_tokens, "flops": plan.flops_per_token * plan.total_tokens,
                    "params_scaling": plan.params_scaling, "world_size": world,
                    "tokens_per_param": float(f"{plan.total_tokens / plan.params_scaling:.3g}")}


def vocab_size(cfg, tokenizer: Path) -> int:
    """The shared tokenizer's, once it exists (or was given); until then the one it will be trained to."""
    from nanochat.tokenizer import Tokenizer

    if cfg.tokenizer or Tokenizer.exists(tokenizer):
        return Tokenizer.load(tokenizer).get_vocab_size()
    return cfg.tok_train.vocab_size
