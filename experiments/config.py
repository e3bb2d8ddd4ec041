"""Hydra composition: the typed schema from nanochat.config, the YAML presets, and the command-line overrides."""

import dataclasses
import difflib
import importlib.util
import os
import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dataclasses import dataclass, field
from typing import Optional

from experiments.cluster import ClusterConfig, Container, CpuJob, SweepResources
from nanochat import config as schema
from nanochat.common import SCRATCH_ENV, UserError, get_base_dir
from nanochat.dataset import DATASETS
from nanochat.runs import resolve_runs_root
from nanochat.stage_table import STAGES



@dataclass
class LaunchConfig(schema.Config):
    """The pipeline's config plus where to run it (nanochat/ never sees Slurm)."""
    cluster: Optional[ClusterConfig] = None  # +cluster=NAME submits to Slurm; None runs on this machine
    # -- scaling sweeps (experiments/sweep/); each run of a sweep is an ordinary run with these cleared ------
    sweep: Optional[str] = None  # miniseries | isoflop; None = one run
    depths: list[int] = field(default_factory=list)
    flops_budgets: list[float] = field(default_factory=list)  # isoflop: each run's target_flops
    sweep_parallelism: int = 0  # %N: at most this many runs of each array at once; 0 = no limit
    sweep_resources: list[SweepResources] = field(default_factory=list)  # one job array per entry, by depth


ConfigStore.instance().store(name="schema", node=LaunchConfig)
SCHEMAS = {"Config": LaunchConfig, "LaunchConfig": LaunchConfig, "TokTrainConfig": schema.TokTrainConfig,
           "TokEvalConfig": schema.TokEvalConfig, "BaseEvalConfig": schema.BaseEvalConfig,
           "FinetuneConfig": schema.FinetuneConfig, "RlConfig": schema.RlConfig,
           "ChatEvalConfig": schema.ChatEvalConfig,
           "ClusterConfig": ClusterConfig, "Container": Container, "CpuJob": CpuJob,
           "SweepResources": SweepResources}


def site_config_dir() -> Path:
    """A site's own presets and cluster profiles (<dir>/cluster/NAME.yaml, <dir>/experiment/NAME.yaml), found
    without forking the repo: $NANOCHAT_CONFIG_DIR, default ~/.config/nanochat."""
    return Path(os.environ.get("NANOCHAT_CONFIG_DIR") or Path.home() / ".config" / "nanochat")


def load_config(overrides: list[str]) -> LaunchConfig:
    """Compose the config; any mistake in the overrides becomes a one-line UserError."""
    profile = any(o.lstrip("+").startswith("cluster=") for o in overrides)
    cluster_keys = [o for o in overrides if o.startswith("cluster.")]
    if cluster_keys and not profile:
        raise UserError(f"{cluster_keys[0]} sets a key of a cluster profile, but none is chosen: add +cluster=NAME "
                        f"({', '.join(group_options('cluster'))})")
    try:
        cfg = OmegaConf.to_object(_compose(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(_explain(exc)) from None
    invalid = schema.problems(cfg)
    if invalid:
        raise UserError("; ".join(invalid))
    if cfg.wandb != "disabled" and importlib.util.find_spec("wandb") is None:  # not after hours of training
        raise UserError(f"wandb={cfg.wandb} needs the wandb package: pip install -e '.[wandb]', or wandb=disabled")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {unknown}; stages are {STAGES}")
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset={cfg.dataset!r}; valid: {', '.join(DATASETS)}")
    for key in ("run_name", "experiment_name"):  # they name the run's (or the sweep's) folder under runs_root
        check_name(key, getattr(cfg, key))
    if cfg.cluster is not None:
        check_interface(cfg.cluster.interface)
        use_site_storage(cfg.cluster)
    return cfg


def _compose(overrides: list[str], with_hydra: bool = False):
    site = site_config_dir()
    search = [f"hydra.searchpath=[file://{site}]"] if site.is_dir() else []
    with initialize_config_module(config_module="experiments.conf", version_base=None):
        return compose(config_name="config", overrides=search + overrides, return_hydra_config=with_hydra)


def group_choices(overrides: list[str]) -> dict[str, str]:
    """Which option of each config group (preset, experiment, cluster) these overrides compose."""
    try:
        choices = _compose(overrides, with_hydra=True).hydra.runtime.choices
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(_explain(exc)) from None
    return {group: name for group, name in choices.items() if not group.startswith("hydra") and name}


def group_options(group: str) -> list[str]:
    """The names a config group (cluster, experiment, preset) takes: the shipped YAML files and the site's own."""
    folders = [Path(__file__).parent / "conf" / group, site_config_dir() / group]
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})


def check_interface(interface: str | None) -> None:
    """NCCL_SOCKET_IFNAME also takes `^lo` (all but), `=ib0` (exact) and lists, but the ranks look up the address
    of this one interface (nanochat.world.interface_address), and GLOO_SOCKET_IFNAME takes names only."""
    if interface and (interface.startswith(("^", "=")) or "," in interface):
        raise UserError(f"cluster.interface={interface!r}: it must name one interface, e.g. ib0 (no ^ exclusions, "
                        f"= prefixes or lists)")


def use_site_storage(cluster: ClusterConfig) -> None:
    """A cluster's data (and runs, under runs/ unless runs_root is set) go where the profile's base_dir says, else
    where nanochat.common.get_base_dir finds them ($NANOCHAT_SCRATCH...). This process then checks what the jobs
    will read, and the jobs are told the same folder (experiments.slurm.job_env). Without a scratch, the first
    use of a profile says in one line that the home default fills a small quota."""
    if cluster.base_dir:
        os.environ["NANOCHAT_BASE_DIR"] = cluster.base_dir
        return
    cluster.base_dir = str(get_base_dir())
    if os.environ.get("NANOCHAT_BASE_DIR") or os.environ.get(SCRATCH_ENV):
        return
    told = Path(cluster.base_dir) / f".told-no-scratch-{cluster.name}"
    if not told.exists():
        told.touch()
        print(f"note: cluster profile {cluster.name!r} names no scratch, so data and runs go to {cluster.base_dir} "
              f"(home quotas are small); set {SCRATCH_ENV}=/your/scratch once (e.g. in ~/.bashrc), or base_dir "
              f"and runs_root in the profile", file=sys.stderr)


# a plain folder name: no '/', no '..', no leading '.' (hidden, or a way out of runs_root), not empty
SAFE_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9_.+=-]*")


def check_name(key: str, value: str | None) -> None:
    """A name that becomes a folder under runs_root is a plain name, or a one-line UserError (None: the default)."""
    if value is not None and not SAFE_NAME.fullmatch(value):
        raise UserError(f"{key}={value!r} is not a plain name: it names a folder under runs_root, so use letters, "
                        f"digits and -_.+= only (no '/', no leading '.', not empty)")


def runs_root(cfg: LaunchConfig) -> Path:
    """Where this config's run folders go (the rule is nanochat.runs.resolve_runs_root's)."""
    return resolve_runs_root(cfg.runs_root, cfg.cluster.runs_root if cfg.cluster else None)


def to_yaml(cfg: LaunchConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _explain(exc: BaseException) -> str:
    """One line from Hydra's chain of wrapped errors; an unknown key also lists the valid ones."""
    lines, text_of_chain = [], ""
    while exc is not None:
        text = str(exc).strip()
        text_of_chain += "\n" + text
        line = text.splitlines()[0] if text else ""
        if line and "$VALUE" not in line and line not in lines:
            lines.append(line.rstrip("."))
        exc = exc.__cause__ or exc.__context__
    message = ": ".join(lines) or "invalid configuration"
    if message.startswith(("Ambiguous value", "Sweep parameters")):  # key=a,b without -m (Hydra says --multirun)
        message += "; to sweep it, put -m first (a list is key=[a,b], a string key='a,b')"
    options = re.search(r"Available options in '\w+':((?:\n\t\S+)+)", text_of_chain)
    if options:
        message += f" (available: {', '.join(options.group(1).split())})"
    unknown = re.search(r"Key '(\w+)' not in '(\w+)'", message)
    if unknown and unknown.group(2) in SCHEMAS:
        valid = [f.name for f in dataclasses.fields(SCHEMAS[unknown.group(2)])]
        where = "" if SCHEMAS[unknown.group(2)] is LaunchConfig else f" in {unknown.group(2)}"
        close = difflib.get_close_matches(unknown.group(1), valid, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        message = f"unknown key '{unknown.group(1)}'{where}; {hint}valid keys: {', '.join(valid)}"
    return message
