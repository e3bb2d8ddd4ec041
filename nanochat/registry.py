"""Every remote file a pipeline downloads, with the pin that makes a download reproducible: a revision and a
checksum. Nothing is fetched here (nanochat.hub and nanochat.download do that); this is the list.

Hub repositories (HubRepo) hold the pretraining shards and the chat tasks' datasets. Each is pinned to a commit,
and a file fetched from it is checked against the sha256 the hub records for it at that commit: for a file kept in
git LFS (every parquet file) that is the LFS object id, part of the commit itself, which the hub reports as the
file's ETag. A commit names its files' bytes, so pinning the commit pins them without a table of 8,000 shard
hashes, and huggingface_hub (which checks sizes, not contents) cannot hand over a corrupted transfer.
Which files of a repo are read is said beside their reader: nanochat.dataset names the shards, tasks/hub.py
each task's files.

Files elsewhere (Asset) are pinned by their own checksum: a sha256, or git's blob id (sha1 of "blob <size>\\0" +
bytes) where git is what publishes one, and by a commit in the URL where the host has commits.
"""

import hashlib
import re
from dataclasses import dataclass

# The revision of a repo whose commit has not been looked up yet: its first staged file pins the folder to the
# branch's commit then (nanochat.hub.STAGED_COMMIT), and every later file must come from that commit. To pin it
# here, on a machine with network: huggingface_hub.HfApi().dataset_info("<repo id>").sha
NOT_YET_PINNED = "main"
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubRepo:
    repo_id: str  # e.g. "allenai/ai2_arc"
    revision: str  # a full commit sha
    repo_type: str = "dataset"

    @property
    def pinned(self) -> bool:
        return bool(_COMMIT.fullmatch(self.revision))


# Pretraining shards (nanochat.dataset): shard_NNNNN.parquet at the repo's root.
CLIMBMIX = HubRepo("karpathy/climbmix-400b-shuffle", "915333b4f8b8684f39aeaafea600fea6f43fb703")
FINEWEB_EDU = HubRepo("karpathy/fineweb-edu-100b-shuffle", NOT_YET_PINNED)

# The chat tasks' datasets (tasks/hub.py): the hub's parquet files of each config.
AI2_ARC = HubRepo("allenai/ai2_arc", "210d026faf9955653af8916fad021475a3f00453")
MMLU = HubRepo("cais/mmlu", "c30699e8356da336a370243923dbaf21066bb9fe")
GSM8K = HubRepo("openai/gsm8k", "e53f048856ff4f594e959d75785d2c2d37b678ee")
HUMANEVAL = HubRepo("openai/openai_humaneval", "7dce6050a7d6d172f3cc5c32aa97f52fa1a2e544")
SMOLTALK = HubRepo("HuggingFaceTB/smol-smoltalk", "f73fe857d519ff6ac5af2ea67c4d3834da7b8bcc")

HUB_REPOS = (CLIMBMIX, FINEWEB_EDU, AI2_ARC, MMLU, GSM8K, HUMANEVAL, SMOLTALK)


@dataclass(frozen=True)
class Asset:
    name: str  # the group a caller asks for, e.g. "gpt2" (several files may share it)
    url: str
    checksum: str  # sha256 (64 hex digits) or git blob id (40)
    dest: str  # relative to $NANOCHAT_BASE_DIR
    unpack_to: str | None = None  # a zip: the folder (relative to $NANOCHAT_BASE_DIR) it unpacks into


def _tiktoken_asset(name: str, url: str, sha256: str) -> Asset:
    # tiktoken looks a file up as TIKTOKEN_CACHE_DIR/sha1(url) and checks its sha256 (tiktoken/load.py),
    # so a file staged under that name makes tiktoken.get_encoding work without network.
    return Asset(name, url, sha256, f"tiktoken/{hashlib.sha1(url.encode()).hexdigest()}")


# tiktoken's GPT-2 and GPT-4 (cl100k_base) encodings, which tok_eval compares against: URLs and hashes as in
# tiktoken_ext/openai_public.py (tiktoken 0.14); tests check they still agree.
_OPENAI = "https://openaipublic.blob.core.windows.net"
ASSETS: list[Asset] = [
    _tiktoken_asset("gpt2", f"{_OPENAI}/gpt-2/encodings/main/vocab.bpe",
                    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    _tiktoken_asset("gpt2", f"{_OPENAI}/gpt-2/encodings/main/encoder.json",
                    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    _tiktoken_asset("cl100k_base", f"{_OPENAI}/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
]

# The DCLM eval bundle that base_eval's CORE metric reads, as upstream downloads it (a zip holding eval_bundle/).
# Its host has no revisions, so the sha256 is the pin: a changed bundle is refused, not silently used.
EVAL_BUNDLE = Asset("eval_bundle", "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip",
                    "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200", "eval_bundle.zip",
                    unpack_to="eval_bundle")
ARCHIVES: list[Asset] = [EVAL_BUNDLE]

# SpellingBee's word list (tasks/spellingbee.py): upstream's file from GitHub, at the commit master had in
# January 2025, checked by git's blob id of the file at that commit.
WORD_LIST = Asset("words", "https://raw.githubusercontent.com/dwyl/english-words/"
                           "20f5cc9b3f0ccc8ce45d814c532b7c2031bba31c/words_alpha.txt",
                  "d3a119e7ce57d068c3f3c9cbd694fc2ff14571ab", "tasks/words_alpha.txt")
