"""nanochat-slurm: the library (model, data, training stages, checkpoints, engine, evaluation, serving).

Nothing in this package imports hydra, submitit or experiments/: stages are plain functions over dataclasses.
"""
