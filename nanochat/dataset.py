"""Pretraining datasets: parquet shards with a `text` column, in upstream nanochat's layout.

    $NANOCHAT_BASE_DIR/base_data_climbmix/shard_00000.parquet ... shard_06542.parquet

Remote datasets are hub repos, downloaded at the commit nanochat.registry pins and checked against the hub's
sha256 of each shard (nanochat.hub); a site mirror that keeps the file names (--base-url, $NANOCHAT_DATA_URL)
is fetched over plain HTTPS instead, each shard's parquet footer checked.

The validation shard of a remote dataset is pinned to its LAST shard (shard_06542 for climbmix), not to the
last one downloaded, so `-n 170` and `-n 240` evaluate on the same text. The embedded corpus ships with the
package and is materialized locally (nanochat.corpus); it is never downloaded.

Stage on a login node (compute nodes are often offline), then train anywhere:

    python -m nanochat.dataset -n 170                  # climbmix shards 0..169 + shard_06542 + assets
    python -m nanochat.dataset --dataset fineweb-edu -n 240 --base-url https://mirror.example/fineweb
    python -m nanochat.dataset --assets-only           # tiktoken files etc. (nanochat.assets)
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat import assets, registry
from nanochat.common import UserError, get_base_dir, run_cli
from nanochat.download import DownloadJob, download_many
from nanochat.hub import HubJob

DATA_URL_ENV = "NANOCHAT_DATA_URL"  # base URL of a site mirror of the dataset being staged
HINT_SHARDS = 170  # shard count suggested in error messages: what the d24 speedrun reads


@dataclass(frozen=True)
class Dataset:
    name: str
    dirname: str  # under $NANOCHAT_BASE_DIR
    repo: registry.HubRepo | None = None  # None: shipped with the package, materialized locally
    last_shard: int = 0  # remote: index of the last shard, which is the validation shard
    tokens_per_shard: int = 0  # about, with upstream's tokenizer: how many shards a planned run needs


DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset("embedded", "base_data_embedded"),
    # upstream stages 170 shards for the d24 speedrun's 5.84B tokens (margin included): 34M a shard
    Dataset("climbmix", "base_data_climbmix", registry.CLIMBMIX, 6542, 34_000_000),
    # upstream's speedrun.sh: 250M characters a shard at 4.8 characters a token
    Dataset("fineweb-edu", "base_data", registry.FINEWEB_EDU, 1822, 52_000_000),
]}


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def data_dir(name: str) -> Path:
    return get_base_dir() / get_dataset(name).dirname


def stage_command(name: str, num_shards: int = HINT_SHARDS) -> str:
    return f"python -m nanochat.dataset --dataset {name} -n {num_shards}"


def list_parquet_files(name: str) -> list[Path]:
    """All complete shards, sorted; .part downloads and temporary files are not shards."""
    folder = data_dir(name)
    if get_dataset(name).repo is None:
        from nanochat.corpus import materialize  # idempotent: writes the shipped corpus only once

        materialize(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(".parquet") and not p.name.startswith("."))


def split_files(name: str, split: str) -> list[Path]:
    """train = every shard but the last, val = [the last]; UserError naming what is missing and the fix."""
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val', not {split!r}")
    ds, folder, files = get_dataset(name), data_dir(name), list_parquet_files(name)
    if ds.repo is None:
        if len(files) < 2:
            raise UserError(f"the embedded corpus in {folder} has {len(files)} shard(s); delete that folder "
                            f"and rerun to rebuild it")
        return files[:-1] if split == "train" else files[-1:]
    val = folder / shard_name(ds.last_shard)
    train = [f for f in files if f != val]
    if not files:
        raise UserError(f"no {name} shards in {folder}; stage them on a login node: {stage_command(name)}")
    if not val.exists():
        raise UserError(f"no {name} validation shard {val.name} in {folder}; stage it on a login node: "
                        f"{stage_command(name, len(train))}")
    if not train:
        raise UserError(f"only the {name} validation shard in {folder}, no training shards; stage them on a "
                        f"login node: {stage_command(name)}")
    return train if split == "train" else [val]


def shards_for(name: str, tokens: int) -> int:
    """Training shards that hold about `tokens` (0 for the embedded corpus: it is all there is)."""
    per_shard = get_dataset(name).tokens_per_shard
    return -(-tokens // per_shard) if per_shard else 0


def check_shards(name: str, num_shards: int = 0) -> list[Path]:
    """The training shards, when at least `num_shards` of them and the validation shard are staged; else a
    UserError naming what is missing and the command that stages it."""
    train = split_files(name, "train")
    if num_shards > 0 and len(train) < num_shards:
        raise UserError(f"only {len(train)} of {num_shards} {name} training shards are staged in {data_dir(name)}; "
                        f"stage them with: {stage_command(name, num_shards)}")
    return train


def check_parquet(path) -> None:
    """Reject a shard whose footer is unreadable (truncated), without a `text` column, or empty."""
    import pyarrow.parquet as pq  # late: keeps `python -m nanochat.dataset` quick to fail when offline

    with pq.ParquetFile(path) as pf:
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        if pf.metadata.num_row_groups < 1:
            raise ValueError("no row groups")


def shard_indices(ds: Dataset, num_shards: int) -> list[int]:
    """The first `num_shards` training shards (-1: all) plus the pinned validation shard."""
    if num_shards < -1:
        raise UserError(f"-n must be -1 (all shards) or a count >= 0, not {num_shards}")
    n = ds.last_shard if num_shards == -1 else min(num_shards, ds.last_shard)
    return list(range(n)) + [ds.last_shard]


def stage(name: str, num_shards: int = -1, workers: int = 8, base_url: str | None = None, *,
          with_assets: bool = True, assets_base_url: str | None = None, retries: int = 5,
          backoff_s: float = 1.0, log=None) -> list[Path]:
    """Download what is missing of `name` (shards + validation shard) and of the assets; one summary line."""
    log = log or (lambda msg: print(msg, flush=True))
    t0 = time.monotonic()
    ds, folder = get_dataset(name), data_dir(name)
    jobs: list[DownloadJob | HubJob] = []
    if ds.repo is None:
        list_parquet_files(name)  # materializes the shipped corpus
        hint = assets.STAGE_HINT
    else:
        mirror = (base_url or os.environ.get(DATA_URL_ENV) or "").rstrip("/")
        names = [shard_name(i) for i in shard_indices(ds, num_shards)]
        if mirror:  # a site's copy: no hub to ask for checksums, so the footer check is what there is
            jobs += [DownloadJob(f"{mirror}/{n}", folder / n, validate=check_parquet) for n in names]
        else:
            jobs += [HubJob(ds.repo, n, folder / n) for n in names]
        hint = stage_command(name, num_shards) + (f" --base-url {base_url}" if base_url else "")
    missing = [j for j in jobs if not j.dest.exists()]
    download_many(missing, workers, retries=retries, backoff_s=backoff_s, hint=hint, log=log)
    if with_assets:  # after the shards, not beside them, so an offline node names the dataset's host
        asset_jobs = assets.asset_jobs(assets_base_url)
        download_many(asset_jobs, workers, retries=retries, backoff_s=backoff_s, hint=hint, log=log)
        missing += asset_jobs
    files = list_parquet_files(name)
    new_mb = sum(j.dest.stat().st_size for j in missing) / 1e6
    log(f"staged {name}: {len(files)} shards in {folder}, {len(missing)} files downloaded ({new_mb:.1f} MB) "
        f"in {time.monotonic() - t0:.1f}s")
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat.dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--num-files", type=int, default=-1, help="training shards to stage (-1: all)")
    p.add_argument("--dataset", default="climbmix", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("-w", "--num-workers", type=int, default=8, help="parallel downloads")
    p.add_argument("--base-url", default=None, help=f"a site mirror of the dataset's files, fetched over plain HTTP "
                                                     f"(or set ${DATA_URL_ENV}); default: the hub at the pinned commit")
    p.add_argument("--assets-only", action="store_true", help="stage only the assets (tiktoken files, ...)")
    p.add_argument("--check", action="store_true", help="download nothing: exit 2 with one line if the dataset "
                                                          "(at least -n training shards and its val shard) is not staged")
    args = p.parse_args(argv)

    def body() -> None:
        if args.check:
            train = check_shards(args.dataset, args.num_files)
            print(f"{args.dataset}: {len(train)} training shards + validation staged in {data_dir(args.dataset)}")
        elif args.assets_only:
            assets.stage_assets(args.num_workers)
            assets.stage_archives(args.num_workers)
            print(f"assets staged in {get_base_dir()}", flush=True)
        else:
            stage(args.dataset, args.num_files, args.num_workers, args.base_url)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
