import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanochat import cpu_bf16
from nanochat.common import UserError
from nanochat.distributed import compute_dtype, peak_bandwidth, peak_flops
from nanochat.stages.training import TrainingSession
from nanochat.world import World, discover_world, reachable_address
from nanochat.scheduler import first_host


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[003-005,9],cpu1", "gpu003"), ("node7", "node7"), ("a100-[12,14]", "a100-12"), ("n1,n2", "n1")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_world_from_torchrun_variables():
    world = discover_world({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h1",
                            "MASTER_PORT": "1234"})
    assert (world.rank, world.local_rank, world.world_size, world.master_addr, world.source) == (3, 3, 8, "h1", "torchrun")


def test_world_from_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[010-011]",
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_ID": "0"}
    world = discover_world(env)
    assert (world.rank, world.local_rank, world.world_size, world.master_addr, world.nodes) == (5, 1, 16, "gpu010", 2)
    assert world.master_port == 15000 + 123456 % 17000 and world.source == "slurm"
    assert discover_world({**env, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1  # srun -n1


@pytest.mark.parametrize("job_id", ["1", "16999", "17000", "999999999"])
def test_the_slurm_port_is_below_the_ephemeral_range(job_id):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0"}
    assert 1024 < discover_world(env).master_port < 32768


@pytest.mark.parametrize("step", [None, "4294967291", "4294967290"])  # none; batch; salloc's interactive step
def test_a_shell_of_the_allocation_is_no_rank_of_it(step):
    """A batch or salloc shell (no srun step) sees the allocation's SLURM_NTASKS=4 and SLURM_PROCID=0: it is one
    process, so that nproc=N starts N local ranks, instead of rank 0 of 4 waiting for three that never come."""
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_JOB_NUM_NODES": "2", **({"SLURM_STEP_ID": step} if step else {})}
    assert (discover_world(env).world_size, discover_world(env).source) == (1, "single")


def test_addresses_the_other_nodes_reach():
    assert reachable_address("10.1.2.3") == "10.1.2.3"
    assert reachable_address("localhost", interface="lo") == "127.0.0.1"  # loopback only: the interface's own
    assert reachable_address("no-such-host.invalid") == "no-such-host.invalid"  # torch says what is wrong with it
    with pytest.raises(UserError, match="network interface 'nope0'"):
        reachable_address("localhost", interface="nope0")


def cpuinfo(tmp_path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    return path


@pytest.mark.parametrize("flags, native", [("", False), ("avx512f avx512bw", False), ("avx512_bf16", True),
                                           ("amx_tile amx_bf16", True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    assert cpu_bf16.native_bf16.__wrapped__(cpuinfo(tmp_path, flags)) is native


def test_compute_dtype_on_cpu_is_bf16_only_where_native(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE")
    assert compute_dtype("cpu")[0] == (torch.bfloat16 if cpu_bf16.native_bf16() else torch.float32)  # this machine
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: native)
        assert compute_dtype("cpu")[0] == dtype


def test_forced_dtypes(monkeypatch, capsys):
    monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: False)
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert compute_dtype("cpu")[0] == torch.bfloat16
    compute_dtype("cpu")
    err = capsys.readouterr().err  # once per process, one line
    assert err.count("\n") == 1 and "NANOCHAT_DTYPE=bfloat16 on a CPU without native bf16" in err
    monkeypatch.setenv("NANOCHAT_DTYPE", "half")
    with pytest.raises(UserError, match="NANOCHAT_DTYPE"):
        compute_dtype("cpu")


@pytest.mark.parametrize("name, flops, bandwidth", [
    ("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),
    ("NVIDIA H100 PCIe", 756e12, 2.0e12),
    ("NVIDIA H100 NVL", 835e12, 3.9e12),
    ("NVIDIA H200", 989e12, 4.8e12),
    ("NVIDIA H200 NVL", 835e12, 4.8e12),
    ("NVIDIA B200", 2.25e15, 8.0e12),
    ("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
    ("NVIDIA A100-PCIE-40GB", 312e12, 1.555e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 1.935e12),
    ("NVIDIA L40S", 362e12, 864e9),
    ("NVIDIA L4", 121e12, 300e9),
    ("NVIDIA A10", 125e12, 600e9),
    ("Tesla V100-SXM2-16GB", 125e12, 900e9),
    ("Tesla V100-PCIE-32GB", 112e12, 900e9),
    ("Tesla V100S-PCIE-32GB", 130e12, 1.134e12),
    ("Tesla T4", 65e12, 320e9),
    ("NVIDIA GeForce RTX 4090", 165e12, 1.008e12),
])
def test_peak_flops_and_bandwidth_by_device_name(name, flops, bandwidth):
    assert peak_flops(name) == flops and peak_bandwidth(name) == bandwidth


@pytest.mark.parametrize("name", ["Some future GPU", "NVIDIA A10G", "NVIDIA L40", "NVIDIA GH200 480GB", "cpu"])
def test_an_unknown_gpu_has_no_peak_and_no_mfu(name):
    # near misses of listed names too: a substring match would give them another GPU's numbers
    assert peak_flops(name) is None and peak_bandwidth(name) is None
    session = SimpleNamespace(peak=peak_flops(name), flops_per_token=1e9, world=SimpleNamespace(world_size=8))
    assert TrainingSession.mfu(session, tok_per_sec=1e6) is None
    session.peak = 1e15
    assert TrainingSession.mfu(session, tok_per_sec=1e6) == pytest.approx(100 * 1e9 * 1e6 / 8e15)


def test_a_missing_peer_fails_instead_of_training_alone(tmp_path):
    """Rank 0 of a 2-rank world whose peer never comes: an error after the timeout, never a 1-rank run."""
    code = "from nanochat.distributed import init_distributed; init_distributed('cpu'); print('TRAINED ALONE')"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "NANOCHAT_PG_TIMEOUT_S": "3", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "TRAINED ALONE" not in result.stdout


def test_rank_0_says_where_the_ranks_meet_once_a_process(monkeypatch, capsys):
    from nanochat import world as world_module

    monkeypatch.setattr(world_module, "_announced", False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    other = World(1, 1, 2, "10.1.2.3", 15007, "torchrun")
    assert world_module.rendezvous_address(other) == "10.1.2.3" and capsys.readouterr().out == ""
    first = World(0, 0, 2, "10.1.2.3", 15007, "torchrun")
    for _ in range(2):  # every stage of a job joins again; the line was the job's first, once
        assert world_module.rendezvous_address(first) == "10.1.2.3"
    assert capsys.readouterr().out == "rendezvous: 2 ranks (torchrun) at 10.1.2.3 port 15007\n"


@pytest.mark.parametrize("compile_key, device, flops_per_token, expected", [
    (None, "cuda", 1.0, True), (None, "cpu", 1e5, False), (None, "cpu", 1e9, False),
    (False, "cuda", 1.0, False), (True, "cpu", 1.0, True)])
def test_the_training_steps_compile_where_it_pays(monkeypatch, capsys, cpu_compile_settings_restored, compile_key,
                                                  device, flops_per_token, expected):
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")  # a C++ compiler, wherever this runs
    session = session_for(compile_key, device, flops_per_token)
    forward = TrainingSession.training_forward(session)
    assert session.compiled is expected and (forward is not session.model) is expected
    assert session.meta["compiled"] is expected  # what its checkpoints record
    assert session.optimizer.compiled == [True] * expected  # the optimizer's updates compile with the model
    assert capsys.readouterr().out.startswith(f"base_train: torch.compile {'on' if expected else 'off'} (")


def session_for(compile_key, device="cpu", flops_per_token=1.0, resumed_meta=None):
    optimizer = SimpleNamespace(compiled=[])
    optimizer.compile_updates = lambda: optimizer.compiled.append(True)
    return SimpleNamespace(cfg=SimpleNamespace(compile=compile_key), device=torch.device(device), n=100,
                           flops_per_token=flops_per_token, stage="base_train", model=torch.nn.Linear(2, 2),
                           optimizer=optimizer, meta={}, resumed_meta=resumed_meta or {})


def test_a_resumed_stage_compiles_as_its_checkpoint_was_trained(monkeypatch, capsys):
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    session = session_for(None, "cpu", 1e9, resumed_meta={"compiled": True})  # begun with compile=true
    assert TrainingSession.training_forward(session) is not session.model and session.compiled is True
    assert "(as its checkpoint was trained)" in capsys.readouterr().out


def test_compile_forced_on_a_cpu_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="torch.compile on a CPU needs a C\\+\\+ compiler"):
        TrainingSession.training_forward(session_for(True))
    session = session_for(None, "cpu", 1e9)  # the default just stays eager
    assert TrainingSession.training_forward(session) is session.model
