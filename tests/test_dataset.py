"""nanochat.dataset and nanochat.assets: staging from a local mirror, the train/val split, offline errors."""

import hashlib
import io
import os
import subprocess
import sys
import time
import types
import zipfile
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import assets, dataset, registry
from nanochat.common import UserError
from nanochat.download import DownloadError
from test_download import FileServer, closed_port_url  # tests/ is on sys.path under pytest

PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def shard_bytes(texts, column="text") -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({column: texts}), buf, row_group_size=2)
    return buf.getvalue()


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    for var in (dataset.DATA_URL_ENV, assets.ASSETS_URL_ENV, "TIKTOKEN_CACHE_DIR", *PROXIES):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "base"


@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.close()


def serve_shards(srv, indices, prefix=""):
    for i in indices:
        srv.add(f"{prefix}/{dataset.shard_name(i)}", shard_bytes([f"doc {i} a", f"doc {i} b", f"doc {i} c"]))


def test_stage_climbmix_from_mirror_pins_val_to_last_shard(base, server):
    serve_shards(server, [0, 1, 2, 6542])
    lines = []
    files = dataset.stage("climbmix", 3, workers=4, base_url=server.url, with_assets=False, backoff_s=0.01,
                          log=lines.append)
    folder = base / "base_data_climbmix"
    assert [f.name for f in files] == [dataset.shard_name(i) for i in (0, 1, 2, 6542)]
    assert dataset.split_files("climbmix", "train") == [folder / dataset.shard_name(i) for i in (0, 1, 2)]
    assert dataset.split_files("climbmix", "val") == [folder / "shard_06542.parquet"]
    assert lines[-1].startswith("staged climbmix: 4 shards") and "4 files downloaded" in lines[-1]
    n_requests = len(server.requests)
    dataset.stage("climbmix", 3, base_url=server.url, with_assets=False, log=lines.append)  # all present
    assert len(server.requests) == n_requests == 4
    # leftovers of interrupted downloads and atomic writes are not shards
    (folder / "shard_00003.parquet.part").write_bytes(b"half")
    (folder / ".shard_00004.parquet.abc.tmp").write_bytes(b"tmp")
    assert dataset.list_parquet_files("climbmix") == files


def test_data_url_env_points_at_a_mirror(base, server, monkeypatch):
    serve_shards(server, [0, 1822], prefix="/mirror")
    monkeypatch.setenv(dataset.DATA_URL_ENV, server.url + "/mirror/")
    files = dataset.stage("fineweb-edu", 1, with_assets=False, log=lambda _: None)
    assert files == [base / "base_data" / "shard_00000.parquet", base / "base_data" / "shard_01822.parquet"]


def test_truncated_shard_is_rejected_by_the_footer_check(base, server):
    serve_shards(server, [0, 6542])
    good = server.files["/shard_00000.parquet"]
    server.add("/shard_00001.parquet", good[: len(good) - 30])  # a consistent but cut-off file
    with pytest.raises(DownloadError, match="shard_00001.parquet.*invalid file"):
        dataset.stage("climbmix", 2, base_url=server.url, with_assets=False, retries=1, backoff_s=0.01,
                      log=lambda _: None)
    assert not (base / "base_data_climbmix" / "shard_00001.parquet").exists()


def test_check_parquet_wants_a_text_column(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(shard_bytes(["a", "b"], column="content"))
    with pytest.raises(ValueError, match="no 'text' column"):
        dataset.check_parquet(path)
    path.write_bytes(shard_bytes(["a", "b"]))
    dataset.check_parquet(path)


def test_shard_indices():
    climbmix = dataset.DATASETS["climbmix"]
    ids = dataset.shard_indices(climbmix, 170)
    assert ids[:3] == [0, 1, 2] and ids[-2:] == [169, 6542] and len(ids) == 171
    assert len(dataset.shard_indices(climbmix, -1)) == 6543
    assert dataset.shard_indices(climbmix, 10**6) == dataset.shard_indices(climbmix, -1)
    with pytest.raises(UserError):
        dataset.shard_indices(climbmix, -2)


def test_split_errors_name_what_is_missing_and_the_command(base):
    folder = base / "base_data_climbmix"
    with pytest.raises(UserError, match="no climbmix shards in .*base_data_climbmix; stage them on a login "
                                        "node: python -m nanochat.dataset --dataset climbmix -n 170"):
        dataset.split_files("climbmix", "train")
    folder.mkdir(parents=True)
    (folder / "shard_06542.parquet").write_bytes(shard_bytes(["v"]))
    with pytest.raises(UserError, match="only the climbmix validation shard"):
        dataset.split_files("climbmix", "train")
    (folder / "shard_06542.parquet").unlink()
    for i in range(2):
        (folder / dataset.shard_name(i)).write_bytes(shard_bytes(["t"]))
    with pytest.raises(UserError, match=r"no climbmix validation shard shard_06542\.parquet.*-n 2$"):
        dataset.split_files("climbmix", "val")
    with pytest.raises(UserError, match="split must be"):
        dataset.split_files("climbmix", "test")


def test_unknown_dataset_lists_valid_names(base):
    with pytest.raises(UserError, match="unknown dataset 'owt'; valid names: embedded, climbmix, fineweb-edu"):
        dataset.data_dir("owt")


def test_embedded_is_materialized_not_downloaded(base, monkeypatch):
    calls = []

    def materialize(dest_dir, num_train_shards=8):  # stands in for nanochat.corpus
        calls.append(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (dest_dir / dataset.shard_name(i)).write_bytes(shard_bytes([f"e{i}"]))
        return sorted(dest_dir.glob("*.parquet"))

    monkeypatch.setitem(sys.modules, "nanochat.corpus", types.SimpleNamespace(materialize=materialize))
    files = dataset.stage("embedded", 170, with_assets=False, log=lambda _: None)
    assert [f.name for f in files] == [dataset.shard_name(i) for i in range(3)]
    assert calls and calls[0] == base / "base_data_embedded"
    assert dataset.split_files("embedded", "val") == files[-1:]
    assert dataset.split_files("embedded", "train") == files[:-1]


# ---------------------------------------------------------------------------------------------------------
# assets


def test_asset_registry_matches_installed_tiktoken(monkeypatch):
    import tiktoken_ext.openai_public as op

    seen = set()
    monkeypatch.setattr(op, "load_tiktoken_bpe", lambda url, expected_hash: seen.add((url, expected_hash)) or {})

    def data_gym(vocab_bpe_file, encoder_json_file, vocab_bpe_hash, encoder_json_hash, **_):
        seen.update({(vocab_bpe_file, vocab_bpe_hash), (encoder_json_file, encoder_json_hash)})
        return {}

    monkeypatch.setattr(op, "data_gym_to_mergeable_bpe_ranks", data_gym)
    op.gpt2()
    op.cl100k_base()
    assert {(a.url, a.checksum) for a in assets.ASSETS} == seen
    for a in assets.ASSETS:  # the file name tiktoken's cache looks for
        assert a.dest == "tiktoken/" + hashlib.sha1(a.url.encode()).hexdigest()


def fake_assets(server, monkeypatch, corrupt=False):
    data = {"/enc/one.bin": b"first asset", "/enc/two.bin": b"second asset"}
    fakes = []
    for path, body in data.items():
        server.add(path, body + (b"!" if corrupt and path.endswith("two.bin") else b""))
        fakes.append(registry.Asset("fake", "https://assets.invalid" + path, hashlib.sha256(body).hexdigest(),
                                  f"tiktoken/{path.rsplit('/', 1)[1]}"))
    monkeypatch.setattr(assets, "ASSETS", fakes)
    return fakes


def test_stage_assets_from_a_mirror(base, server, monkeypatch):
    fakes = fake_assets(server, monkeypatch)
    paths = assets.stage_assets(2, base_url_override=server.url, backoff_s=0.01, log=lambda _: None)
    assert paths == [base / "tiktoken" / "one.bin", base / "tiktoken" / "two.bin"]
    assert [p.read_bytes() for p in paths] == [b"first asset", b"second asset"]
    assert assets.asset_jobs(server.url) == []  # staged: nothing left to do
    assert len(fakes) == 2


def test_corrupt_asset_is_rejected(base, server, monkeypatch):
    fake_assets(server, monkeypatch, corrupt=True)
    with pytest.raises(DownloadError, match="two.bin.*sha256 mismatch"):
        assets.stage_assets(1, base_url_override=server.url, retries=1, backoff_s=0.01, log=lambda _: None)
    assert not (base / "tiktoken" / "two.bin").exists()
    assert not (base / "tiktoken" / "two.bin.part").exists()


def test_an_eval_bundle_other_than_the_pinned_one_is_refused(base, server):
    server.add(urlsplit(registry.EVAL_BUNDLE.url).path, zip_bytes({"eval_bundle/core.yaml": "icl_tasks: []\n"}))
    with pytest.raises(DownloadError, match=r"eval_bundle.zip: sha256 mismatch: got \w+\.\.\., want 90a7c19e"):
        assets.stage_archives(1, base_url_override=server.url, retries=0, log=lambda _: None)
    assert list(base.iterdir()) == []  # nothing unpacked, no zip, no .part


def zip_bytes(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buf.getvalue()


def test_load_tiktoken_is_none_when_not_staged(base, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_tiktoken touched the network")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    assert assets.load_tiktoken("gpt2") is None
    assert assets.load_tiktoken("cl100k_base") is None
    assert "TIKTOKEN_CACHE_DIR" not in os.environ
    with pytest.raises(UserError, match="unknown tiktoken encoding"):
        assets.load_tiktoken("o200k_base")


def test_cli_offline_prints_one_line_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in PROXIES}
    env.update(NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_ASSETS_URL=closed_port_url().rsplit("/", 1)[0])
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "2", "--base-url",
                           closed_port_url().rsplit("/", 1)[0]], env=env, capture_output=True, text=True,
                          timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach 127.0.0.1:")
    assert "offline" in lines[0] and "python -m nanochat.dataset --dataset climbmix -n 2" in lines[0]
    assert elapsed < 10  # startup plus one refused connect; retries with backoff would take > 30 s
