import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# huggingface_hub reads its variables once, when imported: without this its user agent asks the hub for a list of
# AI agents on the first request of a session (to a fake hub in tests/test_hub.py, or the real one)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# every test (and the processes and Slurm jobs it starts) trains in fp32, whether or not this CPU has native bf16
# (the dtype policy's tests unset it): set here, not in a function-scoped fixture, because module-scoped fixtures
# start their runs before any such fixture applies (test_reshard_resume's 2-rank runs trained in bf16 and their
# resumes in fp32: 3e-4 apart one step after the resume)
os.environ["NANOCHAT_DTYPE"] = "float32"

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which but not have "
         "tokenizer parquet shard cluster node rank batch python function value return string number list "
         "élan naïve café 東京 données über").split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of very different lengths (a few words to a few thousand), like web text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = int(rng.lognormvariate(4.0, 1.2)) + 3
        words = [rng.choice(WORDS) for _ in range(length)]
        docs.append(f"Doc {i}: " + " ".join(words) + rng.choice([".", "!", "?\n", "\n\n"]) + f" {rng.randint(0, 99999)}")
    return docs


def write_shards(folder, docs: list[str], n_shards: int, rows_per_group: int = 16):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-len(docs) // n_shards)
    for s in range(n_shards):
        path = folder / f"shard_{s:05d}.parquet"
        pq.write_table(pa.table({"text": docs[s * per:(s + 1) * per]}), path, row_group_size=rows_per_group)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def small_tokenizer():
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.train(iter(synthetic_docs(400, seed=1)), vocab_size=400)


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """No test touches the user's ~/.cache/nanochat or inherits a rank."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: intra-op threads only add contention (10x slower on a busy 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_compile_settings_restored():
    """For tests that call compiled_for_training on the CPU, which sets process-wide settings (deterministic
    algorithms, the activation budget): as they were, for the tests after."""
    import torch
    from torch._functorch import config as functorch_config

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory, functorch_config.activation_memory_budget)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]
    functorch_config.activation_memory_budget = before[3]
