"""A sweep's plan: its keys checked, depths (x budgets) expanded into runs, each run's config composed and its
horizon planned by the depth dial, and the runs grouped by the resources their depth needs."""

import dataclasses
from pathlib import Path

from nanochat.common import UserError
from nanochat.runs import Run

from experiments.cluster import SweepResources

KINDS = ("miniseries", "isoflop")
CLEARED = ["sweep=null", "depths=[]", "flops_budgets=[]"]  # what makes a run of the sweep an ordinary run


@dataclasses.dataclass
class SweepRun:
    name: str
    depth: int
    budget: float | None  # target_flops (isoflop); None: the compute-optimal horizon (miniseries)
    group: int  # index into the resource groups; a group is one job array
    overrides: list[str]  # appended to the sweep's command line, they make this run's config
    cfg: object = None  # composed from those, as the job composes it
    plan: dict = dataclasses.field(default_factory=dict)  # what the depth dial makes of it, for the manifest
    job: dict | None = None  # the job submitted now, for the manifest


def is_done(run: Run, stages: list[str]) -> bool:
    return all(run.is_done(s) for s in stages)


def check(cfg) -> None:
    """The sweep keys, in one line each when wrong."""
    if cfg.sweep is None:
        if cfg.depths or cfg.flops_budgets:
            raise UserError("depths= and flops_budgets= are sweep keys: add +experiment=miniseries or "
                            "+experiment=isoflop (or sweep=miniseries|isoflop)")
        return
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
    if cfg.sweep_parallelism < 0:
        raise UserError(f"sweep_parallelism={cfg.sweep_parallelism} must be >= 0 (0: no limit)")


def sweep_folder(cfg) -> Path:
    from experiments.config import runs_root

    return runs_root(cfg).resolve() / (cfg.run_name or cfg.experiment_name)


def resource_groups(cfg) -> list[SweepResources]:
    """One group per sweep_resources entry, by max_depth; none: one group with the profile's resources."""
    groups = sorted(cfg.sweep_resources, key=lambda r: r.max_depth)
    if not groups:
        return [SweepResources(max_depth=max(cfg.depths))]
    too_deep = [d for d in cfg.depths if d > groups[-1].max_depth]
    if too_deep:
        raise UserError(f"depth(s) {too_deep} are above every sweep_resources max_depth "
                        f"({groups[-1].max_depth}); add an entry for them")
    return groups


def budget_label(budget: float) -> str:
    """1e18, 2.15e18: upstream's tags."""
    mantissa, _, exponent = f"{budget:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def expand(cfg, folder: Path, tokenizer: Path, groups: list[SweepResources]) -> list[SweepRun]:
    """Depths (x budgets) into runs, in submission order: smaller budgets first, so the first isoflop curves
    are complete early."""
    sweep = folder.name
    stages = run_stages(cfg)
    runs = []
    for budget in sorted(cfg.flops_budgets) or [None]:
        for depth in sorted(cfg.depths):
            name = f"{sweep}-d{depth}" if budget is None else f"{sweep}-{budget_label(budget)}-d{depth}"
            group = next(i for i, g in enumerate(groups) if depth <= g.max_depth)
            overrides = [f"run_name={name}", f"runs_root={folder}", f"tokenizer={tokenizer}", f"depth={depth}",
                         f"stages=[{','.join(stages)}]", *CLEARED]
            if budget is not None:
                overrides.append(f"target_flops={budget!r}")
            if groups[group].device_batch_size:
                overrides.append(f"device_batch_size={groups[group].device_batch_size}")
            runs.append(SweepRun(name, depth, budget, group, overrides))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"flops_budgets={cfg.flops_budgets} give runs the same name; make them differ in the "
                        f"first 3 significant digits")
    return runs


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
        run.cfg = load_config(schema_overrides + run.overrides)
        if cfg.cluster:
            gc = group_cluster(cfg.cluster, groups[run.group])
            world = gc.nodes * gc.ranks_per_node
        else:
            world = cfg.nproc
        try:
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
