"""The remote files a pipeline needs besides the pretraining shards (nanochat.dataset) and the chat tasks'
datasets (tasks.stage, from the list in tasks/hub.py), listed here as data.

Clusters train on offline compute nodes, so these are staged ahead on a login node
(`python -m nanochat.dataset --assets-only`) under $NANOCHAT_BASE_DIR, and loaders only ever read local
files. ASSETS holds tiktoken's GPT-2 and GPT-4 (cl100k_base) encodings, which tok_eval compares against;
adding a file is one more Asset line there.

Archives (the DCLM eval bundle that base_eval's CORE metric reads) are listed apart in ARCHIVES: each is
downloaded as a zip and unpacked under $NANOCHAT_BASE_DIR (`unpack_to` names the folder it yields), by
`stage_archives`.
"""

import hashlib
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nanochat.common import UserError, get_base_dir
from nanochat.download import DownloadJob, download_many

ASSETS_URL_ENV = "NANOCHAT_ASSETS_URL"  # a site mirror with the same paths (also what the tests use)
STAGE_HINT = "python -m nanochat.dataset --assets-only"


@dataclass(frozen=True)
class Asset:
    name: str  # the group a caller asks for, e.g. "gpt2" (several files may share it)
    url: str
    sha256: str | None  # None: not pinned (the file is only checked by unpacking it)
    dest: str  # relative to $NANOCHAT_BASE_DIR
    unpack_to: str | None = None  # a zip: the folder (relative to $NANOCHAT_BASE_DIR) it unpacks into


def _tiktoken_asset(name: str, url: str, sha256: str) -> Asset:
    # tiktoken looks a file up as TIKTOKEN_CACHE_DIR/sha1(url) and checks its sha256 (tiktoken/load.py),
    # so a file staged under that name makes tiktoken.get_encoding work without network.
    return Asset(name, url, sha256, f"tiktoken/{hashlib.sha1(url.encode()).hexdigest()}")


# URLs and hashes as in tiktoken_ext/openai_public.py (tiktoken 0.14); tests check they still agree.
_OPENAI = "https://openaipublic.blob.core.windows.net"
ASSETS: list[Asset] = [
    _tiktoken_asset("gpt2", f"{_OPENAI}/gpt-2/encodings/main/vocab.bpe",
                    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    _tiktoken_asset("gpt2", f"{_OPENAI}/gpt-2/encodings/main/encoder.json",
                    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    _tiktoken_asset("cl100k_base", f"{_OPENAI}/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
]


# Upstream nanochat downloads this zip (top-level folder eval_bundle/) and pins no hash; neither do we.
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
EVAL_BUNDLE = Asset("eval_bundle", EVAL_BUNDLE_URL, None, "eval_bundle.zip", unpack_to="eval_bundle")
ARCHIVES: list[Asset] = [EVAL_BUNDLE]


def tiktoken_cache_dir() -> Path:
    return get_base_dir() / "tiktoken"


def asset_path(asset: Asset) -> Path:
    return get_base_dir() / asset.dest


def asset_jobs(base_url_override: str | None = None) -> list[DownloadJob]:
    """Download jobs for the assets not yet on disk; a mirror keeps the original URL's path."""
    mirror = (base_url_override or os.environ.get(ASSETS_URL_ENV) or "").rstrip("/")
    return [DownloadJob(f"{mirror}{urlsplit(a.url).path}" if mirror else a.url, asset_path(a), sha256=a.sha256)
            for a in ASSETS if not asset_path(a).exists()]


def stage_assets(workers: int = 8, base_url_override: str | None = None, *, retries: int = 5,
                 backoff_s: float = 1.0, log=None) -> list[Path]:
    """Download the missing assets (sha256-checked); return the paths of all assets."""
    download_many(asset_jobs(base_url_override), workers, retries=retries, backoff_s=backoff_s,
                  hint=STAGE_HINT, log=log)
    return [asset_path(a) for a in ASSETS]


def _check_zip(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:  # raises BadZipFile on a truncated or non-zip download
        return bool(zf.namelist())


def archive_jobs(base_url_override: str | None = None) -> list[DownloadJob]:
    """Download jobs for the archives not yet unpacked (and not already downloaded)."""
    mirror = (base_url_override or os.environ.get(ASSETS_URL_ENV) or "").rstrip("/")
    return [DownloadJob(f"{mirror}{urlsplit(a.url).path}" if mirror else a.url, asset_path(a), sha256=a.sha256,
                        validate=_check_zip)
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
