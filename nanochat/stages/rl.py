"""Stage rl: policy gradient on GSM8K (or generated arithmetic) as upstream nanochat does it. Each step samples
`num_samples` completions per prompt through the engine (calculator on), rewards each 1 if its answer is right,
uses the advantage r - mean(r) over the prompt's samples, and maximises the advantage-weighted log-likelihood of
the sampled tokens (not the forced tool outputs), normalised per token; on-policy, so no ratio, clip or KL term.

Unlike upstream, rl resumes exactly: rollout seeds are a function of (step, prompt, pass), so a restarted step
samples the same completions and reaches the same weights. A step's prompts (step * examples_per_step + i), their
rollouts and its objective's normalisation do not depend on the world size, so it may resume on any number of
ranks that divides examples_per_step: rank r takes the step's prompts r, r + W, r + 2W, ... and the optimizer
averages the ranks' gradients, each already divided by the rank's prompts (tests/test_reshard_resume.py).
"""

from dataclasses import asdict

import torch

from nanochat.common import UserError, print0
from nanochat.distributed import compute_dtype, sum_across_ranks
from nanochat.engine import Engine
from nanochat.model_io import load_model
from nanochat.reshard import divisors
from nanochat.stages import input_model, load_tokenizer, on_all_ranks
from nanochat.stages.micro_batches import BatchRecord
from nanochat.stages.training import Periodic, StepResult, TrainingSession, fine_tuning_optimizer

STAGE = "rl"


def _rollouts(engine, tokenizer, task, conversation: dict, *, samples: int, batch: int, seed: int, rcfg):
    """(sequences, masks, rewards) of `samples` completions, generated `batch` at a time."""
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = [], []
    for p in range(samples // batch):
        seqs, msks = engine.generate_batch(prompt, num_samples=batch, max_tokens=rcfg.max_new_tokens,
                                           temperature=rcfg.temperature, top_k=rcfg.top_k, seed=seed * 1000 + p)
        sequences += seqs
        masks += msks
    rewards = [task.reward(conversation, tokenizer.decode(seq[len(prompt):])) for seq in sequences]
    return sequences, masks, rewards


def _pass_at_k(model, engine, tokenizer, task, world, rcfg, k: int) -> dict:
    """pass@1..k on the first eval_examples validation prompts, sampled at the training temperature."""
    n = min(rcfg.eval_examples, len(task))
    model.eval()
    hits = [0] * k
    for i in range(world.rank, n, world.world_size):
        _, _, rewards = _rollouts(engine, tokenizer, task, task[i], samples=k, batch=k, seed=10**9 + i, rcfg=rcfg)
        hits = [h + any(r > 0 for r in rewards[:j + 1]) for j, h in enumerate(hits)]
    model.train()
    return {f"pass@{j + 1}": h / n for j, h in enumerate(sum_across_ranks(*hits))}


def _train(cfg, run, world, device, tasks) -> dict:
    rcfg = cfg.rl
    if rcfg.examples_per_step % world.world_size or rcfg.num_samples % rcfg.device_batch_size:
        raise UserError(f"rl.examples_per_step={rcfg.examples_per_step} must divide among {world.world_size} ranks "
                        f"and rl.num_samples={rcfg.num_samples} into batches of rl.device_batch_size="
                        f"{rcfg.device_batch_size}")
    train_task, val_task = tasks.train, tasks.val
    source = input_model(cfg, run, STAGE)
    model, meta = load_model(source, device=device, compute_dtype=compute_dtype(device.type)[0])
    model.train()
    tokenizer = load_tokenizer(cfg, run)
    engine = Engine(model, tokenizer)
    n = rcfg.num_iterations if rcfg.num_iterations > 0 else max(1, len(train_task) // rcfg.examples_per_step)
    optimizer = fine_tuning_optimizer(model, rcfg, rcfg.init_lr_frac, weight_decay=0.0)
    session = TrainingSession(cfg, run, STAGE, world, device, model, optimizer, n,
                              flops_per_token=model.estimate_flops(), reported=("reward",),
                              meta={"model_config": asdict(model.config), "source": meta["path"],
                                    # a step's prompts and seeds are the same on any world size that divides
                                    # them (a refusal of another names examples_per_step)
                                    "world_sizes": divisors(rcfg.examples_per_step),
                                    "examples_per_step": rcfg.examples_per_step})
    session.resume()
    print0(f"rl: from {meta['path']}; {n} steps of {rcfg.examples_per_step} prompts x {rcfg.num_samples} samples "
           f"on {type(train_task).__name__}")
    pad = tokenizer.encode_special("<|assistant_end|>")  # padding only: padded positions are not trained on
    k = min(rcfg.num_samples, rcfg.device_batch_size)
    per_rank = rcfg.examples_per_step // world.world_size
    passes = rcfg.num_samples // rcfg.device_batch_size
    policy = session.training_forward(dynamic=True)  # rollouts vary in length
    record = BatchRecord.from_env(world.rank)

    def gradients(step: int) -> StepResult:
        rewards_seen, tokens = [], 0
        for j in range(per_rank):
            position = world.rank + j * world.world_size  # the prompt's place in the step, on any world size
            index = (step * rcfg.examples_per_step + position) % len(train_task)
            model.eval()
            # seeded by (step, prompt), not by a per-rank generator: the same completions on any world size
            sequences, masks, rewards = _rollouts(engine, tokenizer, train_task, train_task[index],
                                                  samples=rcfg.num_samples, batch=rcfg.device_batch_size,
                                                  seed=step * rcfg.examples_per_step + index, rcfg=rcfg)
            model.train()
            rewards_seen += rewards
            advantages = torch.tensor(rewards, device=device) - sum(rewards) / len(rewards)
            width = max(map(len, sequences))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)
            trained = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)[:, 1:]
            targets = ids[:, 1:].masked_fill(trained == 0, -1)
            if record:  # the prompt and its sampled completions, in the step's order
                record.add(step, position, ids)
            for b in range(0, rcfg.num_samples, rcfg.device_batch_size):
                rows = slice(b, b + rcfg.device_batch_size)
                logp = -policy(ids[rows, :-1], targets[rows], loss_reduction="none").view(targets[rows].shape)
                valid = (targets[rows] >= 0).sum().clamp(min=1)
                objective = (logp * advantages[rows, None]).sum() / (valid * passes * per_rank)
                session.backward(-objective)
                tokens += int(valid)
        reward_sum, samples, total_tokens = sum_across_ranks(sum(rewards_seen), len(rewards_seen), tokens)
        reward = session.counters["reward"] = reward_sum / samples
        # "loss" is minus the mean reward: what the policy gradient pushes down
        return StepResult(-reward, int(total_tokens), {"reward": reward}, text=f" | reward {reward:.3f}")

    def pass_at_k(step: int) -> dict:
        return _pass_at_k(model, engine, tokenizer, val_task, world, rcfg, k)

    session.train(gradients, lambda step: (1.0 - step / n, {}),  # linear to zero, as upstream
                  [Periodic(rcfg.eval_every, pass_at_k)])
    passk = {key: value for key, value in session.counters.items() if key.startswith("pass@")}
    return session.finish(reward=session.counters["reward"], **passk, depth=model.config.n_layer,
                          task=type(train_task).__name__, source=meta["path"])


execute = on_all_ranks(_train)
