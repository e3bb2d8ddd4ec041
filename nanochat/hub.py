"""Files from the Hugging Face hub at the commit nanochat.registry pins, checked against the checksum the hub
records for them at that commit.

huggingface_hub does the transfer, with what a hub client should honour: HF_ENDPOINT (a hub-compatible site
mirror), HF_TOKEN (gated datasets), HF_HUB_OFFLINE, its own cache (a file already there is copied, not
fetched), Xet storage and resuming a stream that breaks. It checks a file's size, not its bytes; so a file lands
in a private folder beside its destination, is hashed, and is renamed into place only when it matches the
sha256 (LFS) or git blob id the hub gives as its ETag; a file that does not match is deleted. Failures take
nanochat.download's policy: transient ones are retried with backoff, the others are one line, and a node that
cannot reach the endpoint at all fails at once naming the command that stages the file on a login node.
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import UserError, fsync_dir
from nanochat.download import TRANSIENT_STATUS, Permanent, Transient, Unreachable, checksum_mismatch, retrying
from nanochat.registry import HubRepo

ENDPOINT_ENV = "HF_ENDPOINT"
OFFLINE_ENV = "HF_HUB_OFFLINE"
# beside the files of a repo the registry does not pin yet: the commit its first file was staged from, which every
# later file of that folder must come from (one folder never mixes two commits of a branch that moved)
STAGED_COMMIT = ".hub-commit"


@dataclass(frozen=True)
class HubJob:
    """One file of a hub repo, to be downloaded to `dest` (see nanochat.download.download_many)."""

    repo: HubRepo
    path: str  # inside the repo
    dest: Path

    def fetch(self, *, retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 30, hint: str | None = None,
              cancel=None, log=None, on_body=None, on_chunk=None) -> Path:
        if self.dest.exists():
            return self.dest
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        # read now, not when huggingface_hub was imported (it reads its variables once, at import)
        endpoint = os.environ.get(ENDPOINT_ENV) or None
        url = self._url(endpoint)

        def attempt() -> Path:
            size = self._download(url, endpoint, timeout_s, hint)
            if on_body is not None:  # huggingface_hub streams on its own: the progress moves a file at a time
                on_body(size)
            if on_chunk is not None:
                on_chunk(size)
            return self.dest

        return retrying(attempt, url, self.dest.name, retries=retries, backoff_s=backoff_s, hint=hint,
                        cancel=cancel, log=log)

    def _url(self, endpoint: str | None) -> str:
        from huggingface_hub import hf_hub_url  # late: a node that only reads staged data never imports it

        return hf_hub_url(self.repo.repo_id, self.path, repo_type=self.repo.repo_type, revision=self.repo.revision,
                          endpoint=endpoint)

    def _download(self, url: str, endpoint: str | None, timeout_s: float, hint: str | None) -> int:
        """One attempt: ask the hub for the file's commit and checksum, download it, check it, move it into place;
        return its size. Raises what nanochat.download.retrying expects."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_download

        repo = self.repo
        try:
            meta = get_hf_file_metadata(url, timeout=timeout_s)
            revision = repo.revision if repo.pinned else self._first_staged(meta.commit_hash)
            if meta.commit_hash != revision:
                raise Permanent(f"the endpoint answered with commit {meta.commit_hash}, not the pinned {revision}"
                                + ("" if repo.pinned else f" ({self.dest.parent / STAGED_COMMIT}: the commit this "
                                   f"folder's first file came from; the branch has moved since)"))
            if len(meta.etag or "") not in (40, 64):
                raise Permanent(f"the endpoint gave no checksum to verify the file against (ETag {meta.etag!r})")
            with tempfile.TemporaryDirectory(dir=self.dest.parent, prefix=f".{self.dest.name}.") as tmp:
                got = Path(hf_hub_download(repo.repo_id, self.path, repo_type=repo.repo_type, revision=revision,
                                           local_dir=tmp, endpoint=endpoint, etag_timeout=timeout_s))
                mismatch = checksum_mismatch(got, meta.etag)
                if mismatch:  # the folder and the bad file go with it
                    raise Transient(mismatch)
                size = got.stat().st_size
                os.replace(got, self.dest)
        except (Transient, Permanent, Unreachable):
            raise
        except Exception as e:
            raise _translated(e, repo, hint) from None
        fsync_dir(self.dest.parent)
        return size


    def _first_staged(self, commit: str) -> str:
        """The commit this folder's files come from for a repo without a pin: the one recorded by its first file,
        or `commit`, recorded now (O_EXCL: of parallel downloads, the first to get here records it)."""
        record = self.dest.parent / STAGED_COMMIT
        try:
            fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return record.read_text().strip() or commit
        with os.fdopen(fd, "w") as f:
            f.write(commit + "\n")
            f.flush()
            os.fsync(f.fileno())
        return commit


def _translated(e: Exception, repo: HubRepo, hint: str | None) -> Exception:
    """huggingface_hub's or httpx's exception `e` as one of nanochat.download's three kinds, or as a one-line
    UserError where the fix is the user's (offline mode, a gated repo); `e` itself when it is none of those."""
    import httpx2
    from huggingface_hub import errors

    name = f"{repo.repo_id}@{repo.revision[:12]}"
    if isinstance(e, errors.OfflineModeIsEnabled):
        how = f"stage it on a login node with: {hint}" if hint else "unset it to download"
        return UserError(f"{OFFLINE_ENV} is set and {name} is not staged here; {how}")
    if isinstance(e, errors.GatedRepoError):
        return UserError(f"{name} is gated: accept its terms on the hub, then set HF_TOKEN to a token of that account")
    if isinstance(e, errors.RepositoryNotFoundError):
        return Permanent("no such repository, or a private one (set HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return Permanent(f"no revision {repo.revision} in {repo.repo_id}")
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return Permanent(f"no such file in {name}")
    if isinstance(e, errors.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        return Transient(f"HTTP {status}") if status in TRANSIENT_STATUS else Permanent(f"HTTP {status}: {e}")
    if isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)):
        return Unreachable(str(e) or type(e).__name__)
    if isinstance(e, (httpx2.TransportError, errors.LocalEntryNotFoundError)):
        return Transient(f"{type(e).__name__}: {e}")
    if isinstance(e, errors.FileMetadataError):  # not a hub endpoint: a proxy's page, a plain web server
        return Permanent(str(e))
    if isinstance(e, OSError) and e.errno is None:  # huggingface_hub's size check after a broken stream
        return Transient(str(e))
    return e
