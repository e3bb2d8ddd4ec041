"""Where a task's rows come from: the handmade fixtures in tasks/data, or the Hugging Face hub's parquet files.

    source="hub"      $NANOCHAT_BASE_DIR/tasks/<repo>/<path as on the hub>, filled by `python -m tasks.stage`
                      on a login node (compute nodes are often offline; nothing here touches the network), at
                      the commit nanochat.registry pins for the repo
    source="fixture"  tasks/data/<name>.parquet: a dozen handmade rows in exactly the hub's columns, for the tests
                      and the embedded pipeline; its scores are labelled nanochat.report.FIXTURE_LABEL

Rows are read with pyarrow (only the columns a task uses) on first use, then visited in the order upstream
nanochat gets from `load_dataset(...).shuffle(seed=42)`: HF datasets draws that order as
`np.random.default_rng(42).permutation(n)` over the rows in file order, so `stop=N` picks the same N rows here.
"""

from dataclasses import dataclass
from pathlib import Path

from nanochat.common import UserError, get_base_dir
from nanochat.registry import AI2_ARC, GSM8K, HUMANEVAL, MMLU, SMOLTALK, HubRepo
from tasks.common import Task

STAGE_COMMAND = "python -m tasks.stage"
FIXTURE_DIR = Path(__file__).parent / "data"
SOURCES = ("hub", "fixture")
SHUFFLE_SEED = 42  # upstream's .shuffle(seed=42)


@dataclass(frozen=True)
class HubData:
    """One split of one dataset config: its parquet files on the hub (in row order) and its fixture."""

    group: str  # what `python -m tasks.stage --tasks` selects: arc, mmlu, gsm8k, humaneval, smoltalk
    repo: HubRepo
    paths: tuple[str, ...]  # inside the repo, at its pinned revision
    fixture: str  # file name in tasks/data

    def mirror_url(self, path: str, mirror: str) -> str:
        """The file on a site mirror that keeps the hub's URL paths."""
        return f"{mirror.rstrip('/')}/datasets/{self.repo.repo_id}/resolve/{self.repo.revision}/{path}"

    def cache_path(self, path: str) -> Path:
        return get_base_dir() / "tasks" / self.repo.repo_id / path


def _one(group, repo, path, fixture):
    return HubData(group, repo, (path,), fixture)


# (task key, subset, split) -> data. Paths as the hub's parquet conversions name them (see the final report).
_SHARD = "00000-of-00001.parquet"
DATA: dict[tuple[str, str, str], HubData] = {
    ("arc", "ARC-Easy", "train"): _one("arc", AI2_ARC, f"ARC-Easy/train-{_SHARD}", "arc_easy_train.parquet"),
    ("arc", "ARC-Easy", "test"): _one("arc", AI2_ARC, f"ARC-Easy/test-{_SHARD}", "arc_easy_test.parquet"),
    ("arc", "ARC-Challenge", "train"): _one("arc", AI2_ARC, f"ARC-Challenge/train-{_SHARD}",
                                            "arc_challenge_train.parquet"),
    ("arc", "ARC-Challenge", "test"): _one("arc", AI2_ARC, f"ARC-Challenge/test-{_SHARD}",
                                           "arc_challenge_test.parquet"),
    ("mmlu", "all", "test"): _one("mmlu", MMLU, f"all/test-{_SHARD}", "mmlu_all_test.parquet"),
    # the auxiliary_train config nests each row under a struct column "train" (see tasks/mmlu.py)
    ("mmlu", "auxiliary_train", "train"): _one("mmlu", MMLU, f"auxiliary_train/train-{_SHARD}",
                                               "mmlu_auxiliary_train.parquet"),
    ("gsm8k", "main", "train"): _one("gsm8k", GSM8K, f"main/train-{_SHARD}", "gsm8k_main_train.parquet"),
    ("gsm8k", "main", "test"): _one("gsm8k", GSM8K, f"main/test-{_SHARD}", "gsm8k_main_test.parquet"),
    ("humaneval", "openai_humaneval", "test"): _one("humaneval", HUMANEVAL,
                                                    f"openai_humaneval/test-{_SHARD}", "humaneval_test.parquet"),
    ("smoltalk", "default", "train"): HubData("smoltalk", SMOLTALK,
                                              tuple(f"data/train-{i:05d}-of-00004.parquet" for i in range(4)),
                                              "smoltalk_train.parquet"),
    ("smoltalk", "default", "test"): _one("smoltalk", SMOLTALK, f"data/test-{_SHARD}",
                                          "smoltalk_test.parquet"),
}
GROUPS = tuple(dict.fromkeys(d.group for d in DATA.values()))


def data_for(task: str, subset: str, split: str, name: str) -> HubData:
    """The data of (task, subset, split); a UserError listing the valid (subset, split) pairs otherwise."""
    if (task, subset, split) not in DATA:
        valid = ", ".join(f"{s}/{p}" for t, s, p in DATA if t == task)
        raise UserError(f"{name}: no data for subset={subset!r} split={split!r}; valid: {valid}")
    return DATA[(task, subset, split)]


def local_files(data: HubData, source: str, name: str) -> list[Path]:
    """The local parquet files of `data` for `source`, checked to exist (one-line UserError otherwise)."""
    if source == "fixture":
        return [FIXTURE_DIR / data.fixture]
    if source != "hub":
        raise UserError(f"{name}: source must be one of {', '.join(SOURCES)}, not {source!r}")
    files = [data.cache_path(p) for p in data.paths]
    if not all(f.exists() for f in files):
        raise UserError(f"{name} is not staged: run `{STAGE_COMMAND}` on a login node (needs internet)")
    return files


class ParquetTask(Task):
    """A task over parquet rows, in upstream's shuffled order. Subclasses set `columns` and turn a row into a
    conversation in `get_example(i)` with `self.row(i)`."""

    columns: tuple[str, ...] = ()

    def __init__(self, data: HubData, source: str, start: int = 0, stop: int | None = None, step: int = 1):
        super().__init__(start=start, stop=stop, step=step)
        self.source = source
        self.files = local_files(data, source, self.name)
        self._table = None  # read on first use: constructing a task (e.g. to list a mixture) stays cheap
        self._order = None

    def num_examples(self) -> int:
        self._load()
        return self._table.num_rows

    def row(self, index: int) -> dict:
        self._load()
        return self._table.slice(int(self._order[index]), 1).to_pylist()[0]

    def _load(self):
        if self._table is not None:
            return
        import numpy as np  # here with pyarrow, which needs it anyway: building a task (at submission) reads no rows
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            tables = [pq.read_table(f, columns=list(self.columns)) for f in self.files]
        except (OSError, pa.ArrowException) as e:  # a truncated or foreign file in the cache
            raise UserError(f"{self.name}: cannot read {self.files[0].parent}: {e}; delete it and rerun "
                            f"`{STAGE_COMMAND}`") from None
        self._table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self._order = np.random.default_rng(SHUFFLE_SEED).permutation(self._table.num_rows)
