"""Stage mid_train (optional, off by default as upstream since January 2026): the fine-tuning loop on a
conversation mixture that teaches the special tokens and tool use before SFT (see finetune.py)."""

from nanochat.stages.finetune import finetune_stage

run = finetune_stage("mid_train")
