"""Download the task datasets: their parquet files from the Hugging Face hub into
$NANOCHAT_BASE_DIR/tasks/<repo>/<path>, where the tasks read them with source="hub", and SpellingBee's word list
into $NANOCHAT_BASE_DIR/tasks/words_alpha.txt. Run it on a login node (compute nodes are often offline); files
already there are skipped, and each lands atomically (a .part file, checked, then renamed).

    python -m tasks.stage                                  # all: arc, mmlu, gsm8k, humaneval, smoltalk, spellingbee
    python -m tasks.stage --tasks arc,gsm8k
    python -m tasks.stage --base-url https://mirror.example   # a site mirror that keeps the original URL paths
"""

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit

from nanochat.common import UserError, get_base_dir, run_cli
from nanochat.download import DownloadJob, download_many
from tasks.hub import DATA, GROUPS as HUB_GROUPS, HF_ENDPOINT_ENV, STAGE_COMMAND

GROUPS = HUB_GROUPS + ("spellingbee",)


def _readable_parquet(path) -> bool:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows >= 0  # raises on an HTML error page or a truncated file


def _nonempty(path) -> bool:
    return Path(path).stat().st_size > 0


def files_for(groups, base_url: str | None = None) -> list[tuple[str, str, Path, object]]:
    """(name, url, local path, validator) of every file of `groups`."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(GROUPS)}")
    files = []
    for data in DATA.values():
        if data.group in groups:
            files += [(f"{data.repo}/{p}", data.url(p, base_url), data.cache_path(p), _readable_parquet)
                      for p in data.paths]
    if "spellingbee" in groups:  # not on the hub: upstream's word list from GitHub, named by tasks/spellingbee.py
        from tasks.spellingbee import HUB_WORDS_NAME, HUB_WORDS_URL

        url = f"{base_url.rstrip('/')}{urlsplit(HUB_WORDS_URL).path}" if base_url else HUB_WORDS_URL
        files.append((f"dwyl/english-words/{HUB_WORDS_NAME}", url, get_base_dir() / "tasks" / HUB_WORDS_NAME,
                      _nonempty))
    return files


def download(groups=GROUPS, base_url: str | None = None, workers: int = 8, *, retries: int = 5,
          backoff_s: float = 1.0, log=print) -> list[Path]:
    """Download the missing files of `groups`; print one line per file; return the local paths."""
    files = files_for(groups, base_url)
    present = {dest for _, _, dest, _ in files if dest.exists()}
    jobs = [DownloadJob(url, dest, validate=check) for _, url, dest, check in files if dest not in present]

    def retries_only(msg: str):
        # download_many's progress lines name only the file (ARC-Easy and ARC-Challenge both have a
        # test-00000-of-00001.parquet), so keep its retry notes and print our own line per file below
        if msg.startswith("retry"):
            log(msg)

    if jobs:
        log(f"downloading {len(jobs)} of {len(files)} files ...")
    download_many(jobs, workers, retries=retries, backoff_s=backoff_s, hint=STAGE_COMMAND, log=retries_only)
    for name, _, dest, _ in files:
        state = "present" if dest in present else "downloaded"
        log(f"{state:10s} {name} ({dest.stat().st_size / 1e6:.1f} MB) -> {dest}")
    return [dest for _, _, dest, _ in files]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.stage", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(GROUPS), help=f"comma-separated, from: {', '.join(GROUPS)}")
    p.add_argument("--base-url", default=None,
                   help=f"a mirror keeping the original URL paths (hub files default to ${HF_ENDPOINT_ENV}, "
                        "else https://huggingface.co)")
    p.add_argument("-w", "--num-workers", type=int, default=8, help="parallel downloads")
    args = p.parse_args(argv)
    return run_cli(lambda: download([g.strip() for g in args.tasks.split(",") if g.strip()], args.base_url,
                                 args.num_workers))


if __name__ == "__main__":
    sys.exit(main())
