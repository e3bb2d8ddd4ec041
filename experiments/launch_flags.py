"""Hydra's command-line flags for the launcher. It composes with Hydra's compose API (so that a submission returns
at once and a sweep is one set of job arrays), which has no flags of its own; these are the ones researchers
type, answered from the same composition the run would use:

    --help, -h                        this launcher's help page: common keys, presets, experiments, profiles
    --cfg job, -c job                 the composed config, as YAML, then exit (nothing is written)
    --info                            where the config comes from: search path, defaults, overrides, run folder
    --shell-completion install=bash   a bash completion script for nanochat-launch (the same command, installed
                                      by `pip install -e .`): eval "$(nanochat-launch -sc install=bash)"
    --multirun, -m                    a sweep of every combination of the values of key=a,b overrides: on a cluster
                                      job arrays, here one run after another (experiments/sweep/multirun.py);
                                      -m --info lists the planned runs, -m --cfg job prints each one's config
"""

import dataclasses
import itertools
from pathlib import Path

from nanochat.common import UserError

CONF = Path(__file__).resolve().parent / "conf"
# the keys a first page shows (the rest: --cfg job, and the schema's comments)
COMMON_KEYS = ["depth", "run_name", "runs_root", "stages", "dataset", "device", "nproc", "num_iterations",
               "device_batch_size", "max_seq_len", "total_batch_size", "wandb", "save_every_minutes"]


def split_multirun(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether argv asks for a multirun (-m among the flags, which come before the overrides), and the rest,
    which handle() then answers or launches."""
    # the flags, with --cfg's argument `job`, run up to the first override
    flags = len(argv) - len(list(itertools.dropwhile(lambda a: a.startswith("-") or a == "job", argv)))
    multirun = [i for i in range(flags) if argv[i] in ("-m", "--multirun")]
    return bool(multirun), [a for i, a in enumerate(argv) if i not in multirun]


def handle(argv: list[str], multirun: bool = False) -> int | None:
    """Answer a flag and return the exit code, or None when argv holds only overrides. After -m, --cfg job and
    --info answer for each run of the sweep."""
    if not argv or not argv[0].startswith("-"):
        if any(a.startswith("-") for a in argv):
            raise UserError(f"flags go before the overrides: {' '.join(a for a in argv if a.startswith('-'))}")
        return None
    flag, rest = argv[0], argv[1:]
    if flag in ("-h", "--help"):
        print(help_page())
    elif flag in ("-c", "--cfg"):
        if not rest or rest[0] != "job":
            raise UserError("--cfg takes 'job' (the pipeline's config; there is no separate Hydra job config here)")
        from experiments.config import load_config, to_yaml

        if multirun:
            print("\n".join(f"# run {run.name}\n{to_yaml(run.cfg)}" for run in sweep_plan(rest[1:]).runs), end="")
        else:
            print(to_yaml(load_config(without_resume_flag(rest[1:]))), end="")
    elif flag == "--info":
        print(sweep_info(sweep_plan(rest)) if multirun else info(without_resume_flag(rest)))
    elif flag in ("-sc", "--shell-completion"):
        if rest != ["install=bash"]:
            raise UserError('--shell-completion takes install=bash: eval "$(nanochat-launch -sc install=bash)"')
        print(bash_completion())
    else:
        raise UserError(f"unknown flag {flag}; the launcher takes --help, --cfg job, --info, --shell-completion "
                        f"install=bash, -m, then key=value overrides")
    return 0


def without_resume_flag(overrides: list[str]) -> list[str]:
    from experiments.resume_guard import split_resume_flag

    return split_resume_flag(overrides)[0]


def sweep_plan(overrides: list[str]):
    """The runs a -m command would make, planned as the launch would plan them, nothing written."""
    from experiments.config import load_config
    from experiments.sweep.multirun import parse_multirun
    from experiments.sweep.plan import plan_sweep

    fixed, axes = parse_multirun(without_resume_flag(overrides))
    return plan_sweep(load_config(fixed), fixed, axes)


def sweep_info(plan) -> str:
    runs = "\n".join(f"  {run.name}  {' '.join(run.overrides[-len(plan.axes):])}  {run.plan['steps']} steps"
                     for run in plan.runs)
    axes = " x ".join(f"{key} ({len(values)})" for key, values in plan.axes.items())
    return f"sweep folder: {plan.folder}\n{plan.kind} of {axes}: {len(plan.runs)} runs\n{runs}"


def help_page() -> str:
    from experiments.config import group_options, load_config

    from experiments.pipeline import run_folder

    embedded = load_config([])
    shown = {key: getattr(embedded, key) for key in COMMON_KEYS}
    shown.update(run_name=f"{run_folder(embedded).root.name} (<experiment_name>-d<depth>)",
                 runs_root=f"{run_folder(embedded).root.parent} ($NANOCHAT_BASE_DIR/runs)",
                 stages=f"[{','.join(embedded.stages)}]", device="(empty: cuda if there is a GPU, else cpu)")
    width = max(map(len, COMMON_KEYS))
    keys = "\n".join(f"  {key:<{width}}  {value}" for key, value in shown.items())
    return f"""usage: python -m experiments.launch [--help | --cfg job | --info | -sc install=bash | -m] [key=value ...]

Runs the pipeline (tokenizer, pretraining, evaluation, SFT, RL, chat evaluation, report) on this machine, or
submits it to Slurm with +cluster=NAME and returns at once. With no arguments: the embedded default, a tiny model
trained on this machine's CPU from data the project ships, offline.

Common keys, with their values on the embedded default (every key: --cfg job):
{keys}

Groups:
  +cluster=NAME     submit to Slurm with a cluster profile: {', '.join(group_options('cluster'))}
  +experiment=NAME  a named experiment (GPU-sized): {', '.join(group_options('experiment'))}
  preset=NAME       the sizes under everything else: {', '.join(group_options('preset'))} (default embedded)

Examples:
  python -m experiments.launch depth=6 num_iterations=200
  python -m experiments.launch +cluster=h100 depth=24
  python -m experiments.launch +cluster=h100 +experiment=miniseries depths=[10,12,14]
  python -m experiments.launch -m +cluster=h100 +experiment=d12 matrix_lr=0.01,0.02 depth=12,16
  python -m experiments.launch --cfg job +cluster=h100 depth=24

Flags (before the overrides): --cfg job prints the composed config; --info says where it comes from;
-sc install=bash prints a bash completion script; -m sweeps every combination of the key=a,b values (one run
each, in <runs_root>/<run_name or experiment_name-multirun>/, named after the values; a rerun skips finished runs;
with --info or --cfg job it shows the planned runs or their configs and runs nothing).
+resume_changed=true resumes a run whose saved config differs.
Exit codes: 0 done or submitted; 2 a user error (one line); 75/76/77 stopped after saving (time limit or
preemption / SIGTERM / no progress): run the same command again to resume; 1 anything else."""


def info(overrides: list[str]) -> str:
    from experiments.config import group_choices, load_config, runs_root, site_config_dir
    from experiments.pipeline import run_folder

    cfg = load_config(overrides)
    site = site_config_dir()
    defaults = ["schema (nanochat/config.py)"] + [f"{group}/{name}.yaml"
                                                  for group, name in group_choices(overrides).items()]
    where = (f"{run_folder(cfg).root}" if cfg.sweep is None else
             f"{runs_root(cfg) / (cfg.run_name or cfg.experiment_name)} (a sweep: one run folder per run)")
    return "\n".join([
        f"config search path: pkg://experiments.conf ({CONF}); site: {site} "
        f"({'used' if site.is_dir() else 'absent'}; $NANOCHAT_CONFIG_DIR)",
        f"composed from: {', '.join(defaults)}, then the overrides",
        f"overrides: {' '.join(overrides) or '(none)'}",
        f"run folder: {where}",
        f"runs on: {'Slurm, profile ' + cfg.cluster.name if cfg.cluster else 'this machine'}"])


def completion_words() -> list[str]:
    """Every key as `key=` (nested ones dotted), each choice key's values, and the groups' options."""
    from experiments.config import LaunchConfig, group_options

    words = []

    def walk(schema, prefix: str) -> None:
        for f in dataclasses.fields(schema):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            elif f.name != "cluster":
                words.append(f"{prefix}{f.name}=")
                words.extend(f"{prefix}{f.name}={value}" for value in f.metadata.get("choices", ()) if value)

    walk(LaunchConfig, "")
    for group in ("cluster", "experiment"):
        words.extend(f"+{group}={name}" for name in group_options(group))
    words.extend(f"preset={name}" for name in group_options("preset"))
    return words + ["--help", "--cfg", "--info", "--shell-completion", "--multirun"]


def bash_completion() -> str:
    words = " ".join(completion_words())
    # bash splits words at '=' (COMP_WORDBREAKS): the override being typed is the text since the last space, and
    # a reply replaces only the part after its last '='
    return f"""_nanochat_launch() {{
    local line=${{COMP_LINE:0:COMP_POINT}}
    local cur=${{line##* }}
    COMPREPLY=($(compgen -W "{words}" -- "$cur"))
    [[ ${{#COMPREPLY[@]}} -eq 1 && ${{COMPREPLY[0]}} == *= ]] && compopt -o nospace
    [[ $cur == *=* ]] && COMPREPLY=("${{COMPREPLY[@]##*=}}")
}}
complete -o default -F _nanochat_launch nanochat-launch"""
