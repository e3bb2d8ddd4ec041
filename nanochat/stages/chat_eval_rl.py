"""Stage chat_eval_rl: the RL model on the chat task suite (see chat_eval.py)."""

from nanochat.stages.chat_eval import evaluation_stage

run = evaluation_stage("chat_eval_rl", "rl", "rl_checkpoint")
