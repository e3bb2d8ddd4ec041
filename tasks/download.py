"""Download the task datasets: their parquet files from the Hugging Face hub into
$NANOCHAT_BASE_DIR/tasks/<repo>/<path>, where the tasks read them with source="hub", and SpellingBee's word list
into $NANOCHAT_BASE_DIR/tasks/words_alpha.txt. Run it on a login node (compute nodes are often offline); files
already there are skipped, and each lands atomically once checked against the checksum nanochat.registry pins
(hub files: the hub's sha256 at the pinned commit, through huggingface_hub, so HF_ENDPOINT and HF_TOKEN apply).

    python -m tasks.stage                                  # all: arc, mmlu, gsm8k, humaneval, smoltalk, spellingbee
    python -m tasks.stage --tasks arc,gsm8k
    python -m tasks.stage --base-url https://mirror.example   # a site mirror that keeps the original URL paths
"""

import argparse
import sys
from pathlib import Path

from nanochat.assets import mirrored
from nanochat.common import UserError, get_base_dir, run_cli
from nanochat.download import DownloadJob, download_many
from nanochat.hub import HubJob
from nanochat.registry import WORD_LIST
from tasks.hub import DATA, GROUPS as HUB_GROUPS, STAGE_COMMAND

GROUPS = HUB_GROUPS + ("spellingbee",)


def _readable_parquet(path) -> bool:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows >= 0  # raises on an HTML error page or a truncated file


def files_for(groups, base_url: str | None = None) -> list[tuple[str, DownloadJob | HubJob]]:
    """(name, download job) of every file of `groups`: from the hub, or from the site mirror `base_url`."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(GROUPS)}")
    files = []
    for data in DATA.values():
        if data.group in groups:
            for p in data.paths:
                dest = data.cache_path(p)
                # a mirror has no hub to ask for checksums: the parquet footer check is what there is
                job = (DownloadJob(data.mirror_url(p, base_url), dest, validate=_readable_parquet) if base_url
                       else HubJob(data.repo, p, dest))
                files.append((f"{data.repo.repo_id}/{p}", job))
    if "spellingbee" in groups:  # not on the hub: upstream's word list from GitHub
        files.append(("dwyl/english-words/words_alpha.txt",
                      DownloadJob(mirrored(WORD_LIST.url, base_url), get_base_dir() / WORD_LIST.dest,
                                  checksum=WORD_LIST.checksum)))
    return files


def download(groups=GROUPS, base_url: str | None = None, workers: int = 8, *, retries: int = 5,
          backoff_s: float = 1.0, log=print) -> list[Path]:
    """Download the missing files of `groups`; print one line per file; return the local paths."""
    files = files_for(groups, base_url)
    present = {job.dest for _, job in files if job.dest.exists()}
    jobs = [job for _, job in files if job.dest not in present]

    def retries_only(msg: str):
        # download_many's progress lines name only the file (ARC-Easy and ARC-Challenge both have a
        # test-00000-of-00001.parquet), so keep its retry notes and print our own line per file below
        if msg.startswith("retry"):
            log(msg)

    if jobs:
        log(f"downloading {len(jobs)} of {len(files)} files ...")
    download_many(jobs, workers, retries=retries, backoff_s=backoff_s, hint=STAGE_COMMAND, log=retries_only)
    for name, job in files:
        state = "present" if job.dest in present else "downloaded"
        log(f"{state:10s} {name} ({job.dest.stat().st_size / 1e6:.1f} MB) -> {job.dest}")
    return [job.dest for _, job in files]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.stage", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(GROUPS), help=f"comma-separated, from: {', '.join(GROUPS)}")
    p.add_argument("--base-url", default=None,
                   help="a site mirror keeping the original URL paths, fetched over plain HTTP (default: the hub at "
                        "the pinned commits, or $HF_ENDPOINT)")
    p.add_argument("-w", "--num-workers", type=int, default=8, help="parallel downloads")
    args = p.parse_args(argv)
    return run_cli(lambda: download([g.strip() for g in args.tasks.split(",") if g.strip()], args.base_url,
                                 args.num_workers))


if __name__ == "__main__":
    sys.exit(main())
