"""The pipeline's stages, in the order they run: the one table that the pipeline, the Slurm submission, model
resolution, the chat commands and the report read. Adding a stage is one line here plus its code (and, for a
stage that trains or evaluates on chat tasks, what tasks/mixtures.py's stage_tasks builds for it).

Torch-free, like nanochat.runs (the login node and scaling/ import it).
"""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # also its folder in the run
    entry: str  # "module:function" of its `(cfg, run, tasks) -> summary` function
    all_ranks: bool = True  # runs on every rank of the job; else on rank 0 while the others wait for its summary
    cpu_job: bool = False  # on a cluster: in the small CPU job that runs before the GPU job
    inputs: tuple[str, ...] = ()  # the stages whose model it starts from, first done wins
    input_key: str | None = None  # the config key that names that model instead (base_checkpoint=PATH)
    makes: str | None = None  # the model it leaves: "base" or "chat"
    chat_name: str | None = None  # its name for the chat commands' --stage
    default: bool = True  # in the default `stages`

    def load(self):
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), function)


_S = "nanochat.stages."
TABLE = (
    Stage("tok_train", _S + "tok_train:execute", all_ranks=False, cpu_job=True),
    Stage("tok_eval", _S + "tok_eval:execute", all_ranks=False, cpu_job=True),
    Stage("base_train", _S + "base_train:execute", makes="base", chat_name="base"),
    Stage("base_eval", _S + "base_eval:execute", inputs=("base_train",), input_key="base_checkpoint"),
    Stage("mid_train", _S + "finetune:mid_train", inputs=("base_train",), input_key="base_checkpoint",
          makes="chat", default=False),  # off by default, as upstream since January 2026
    Stage("sft", _S + "finetune:sft", inputs=("mid_train", "base_train"), input_key="base_checkpoint",
          makes="chat", chat_name="sft"),
    Stage("chat_eval_sft", _S + "chat_eval:chat_eval_sft", inputs=("sft",), input_key="sft_checkpoint"),
    Stage("rl", _S + "rl:execute", inputs=("sft",), input_key="sft_checkpoint", makes="chat", chat_name="rl"),
    Stage("chat_eval_rl", _S + "chat_eval:chat_eval_rl", inputs=("rl",), input_key="rl_checkpoint"),
)
BY_NAME = {stage.name: stage for stage in TABLE}
STAGES = [stage.name for stage in TABLE]
DEFAULT_STAGES = [stage.name for stage in TABLE if stage.default]
CPU_JOB_STAGES = [stage.name for stage in TABLE if stage.cpu_job]
# --stage name -> stage folder, in the chat commands' order of preference: the latest in the pipeline first
CHAT_STAGES = {stage.chat_name: stage.name for stage in reversed(TABLE) if stage.chat_name}
