"""Stage sft: supervised fine-tuning of the base (or mid-trained) model into a chat model (see finetune.py)."""

from nanochat.stages.finetune import finetune_stage

run = finetune_stage("sft")
