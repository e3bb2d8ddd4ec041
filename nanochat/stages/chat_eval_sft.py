"""Stage chat_eval_sft: the SFT model on the chat task suite (see chat_eval.py)."""

from nanochat.stages.chat_eval import evaluation_stage

run = evaluation_stage("chat_eval_sft", "sft", "sft_checkpoint")
