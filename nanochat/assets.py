"""Staging the remote files a pipeline needs besides the pretraining shards (nanochat.dataset) and the chat
tasks' datasets (tasks.stage): tiktoken's encodings (ASSETS) and the CORE eval bundle (ARCHIVES), listed and
pinned in nanochat.registry.

Clusters train on offline compute nodes, so these are staged ahead on a login node
(`python -m nanochat.dataset --assets-only`) under $NANOCHAT_BASE_DIR, and loaders only ever read local
files. Each file is checked against its pinned checksum before it is moved into place. An archive is
downloaded as a zip and unpacked under $NANOCHAT_BASE_DIR (`unpack_to` names the folder it yields) by
`stage_archives`.
"""

import os
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

from nanochat.common import UserError, get_base_dir
from nanochat.download import DownloadJob, download_many
from nanochat.registry import ARCHIVES, ASSETS, Asset

ASSETS_URL_ENV = "NANOCHAT_ASSETS_URL"  # a site mirror with the same paths (also what the tests use)
STAGE_HINT = "python -m nanochat.dataset --assets-only"


def tiktoken_cache_dir() -> Path:
    return get_base_dir() / "tiktoken"


def asset_path(asset: Asset) -> Path:
    return get_base_dir() / asset.dest


def mirrored(url: str, mirror: str | None) -> str:
    """`url` on a site mirror that keeps the original path (unchanged without a mirror)."""
    return f"{mirror.rstrip('/')}{urlsplit(url).path}" if mirror else url


def asset_jobs(base_url_override: str | None = None) -> list[DownloadJob]:
    """Download jobs for the assets not yet on disk; a mirror keeps the original URL's path."""
    mirror = base_url_override or os.environ.get(ASSETS_URL_ENV)
    return [DownloadJob(mirrored(a.url, mirror), asset_path(a), checksum=a.checksum)
            for a in ASSETS if not asset_path(a).exists()]


def stage_assets(workers: int = 8, base_url_override: str | None = None, *, retries: int = 5,
                 backoff_s: float = 1.0, log=None) -> list[Path]:
    """Download the missing assets (checksum-checked); return the paths of all assets."""
    download_many(asset_jobs(base_url_override), workers, retries=retries, backoff_s=backoff_s,
                  hint=STAGE_HINT, log=log)
    return [asset_path(a) for a in ASSETS]


def _check_zip(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:  # raises BadZipFile on a truncated or non-zip download
        return bool(zf.namelist())


def archive_jobs(base_url_override: str | None = None) -> list[DownloadJob]:
    """Download jobs for the archives not yet unpacked (and not already downloaded)."""
    mirror = base_url_override or os.environ.get(ASSETS_URL_ENV)
    return [DownloadJob(mirrored(a.url, mirror), asset_path(a), checksum=a.checksum, validate=_check_zip)
            for a in ARCHIVES if not (get_base_dir() / a.unpack_to).is_dir() and not asset_path(a).exists()]


def unpack_archive(asset: Asset) -> Path:
    """Unzip a downloaded archive into $NANOCHAT_BASE_DIR/<unpack_to> (all or nothing), then delete the zip."""
    base, target = get_base_dir(), get_base_dir() / asset.unpack_to
    zip_path = asset_path(asset)
    if target.is_dir():
        return target
    with tempfile.TemporaryDirectory(dir=base, prefix=f".{asset.unpack_to}.") as tmp:
        out = Path(tmp) / "unzipped"
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(out)
        # the zip holds either the folder itself (upstream's eval_bundle.zip) or just its contents
        inner = out / asset.unpack_to
        try:
            os.replace(inner if inner.is_dir() else out, target)
        except OSError:
            if not target.is_dir():  # else another process unpacked it first
                raise
    zip_path.unlink(missing_ok=True)
    return target


def staged_archive(asset: Asset) -> Path:
    """The folder an archive was unpacked into; a UserError naming the command that stages it when it was not."""
    folder = get_base_dir() / asset.unpack_to
    if not folder.is_dir():
        raise UserError(f"the {asset.name} is not staged in {folder}; stage it with: {STAGE_HINT}")
    return folder


def stage_archives(workers: int = 8, base_url_override: str | None = None, *, retries: int = 5,
                   backoff_s: float = 1.0, log=None) -> list[Path]:
    """Download and unpack the missing archives (the eval bundle); return their folders."""
    download_many(archive_jobs(base_url_override), workers, retries=retries, backoff_s=backoff_s,
                  hint=STAGE_HINT, log=log)
    return [unpack_archive(a) for a in ARCHIVES]


def load_tiktoken(name: str):
    """tiktoken's encoding `name` ("gpt2", "cl100k_base") from the staged files; None if they are not staged.

    Never touches the network: tok_eval skips the comparison instead of hanging on an offline node.
    """
    files = [a for a in ASSETS if a.name == name]
    if not files:
        names = sorted({a.name for a in ASSETS if a.dest.startswith("tiktoken/")})
        raise UserError(f"unknown tiktoken encoding {name!r}; staged ones are: {', '.join(names)}")
    if not all(asset_path(a).exists() for a in files):
        return None
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_cache_dir())
    import tiktoken  # late: only tok_eval needs it

    return tiktoken.get_encoding(name)
