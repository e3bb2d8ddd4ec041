"""python -m experiments.chat on the local Slurm cluster: a job serves the web chat on a node's own address with
a token, and the command prints the tunnel line and the URL once the server answers."""

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from slurm_fixtures import sh, slurm_cluster  # noqa: F401 (fixture)
from test_chat_cli import run_folder  # noqa: F401 (fixture)

pytestmark = pytest.mark.slurm


def test_chat_job_prints_a_working_tunnel_line(slurm_cluster, run_folder, tmp_path):  # noqa: F811
    result = subprocess.run([sys.executable, "-m", "experiments.chat", "+cluster=localslurm", "tiny-d2",
                             "idle_min=2", "wait_s=120"], capture_output=True, text=True, timeout=200,
                            env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    job = int(re.search(r"Submitted job (\d+)", result.stdout).group(1))
    try:
        port, host = re.search(r"ssh -N -L (\d+):([\d.]+):\1 ", result.stdout).groups()
        token = re.search(r"\?token=(\S+)", result.stdout).group(1)
        assert "-J " in result.stdout  # the ProxyJump variant
        with pytest.raises(urllib.error.HTTPError) as denied:  # the token is required, whatever the address
            urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=10)
        assert denied.value.code == 401
        import openai
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=token)
        reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        sh("scancel", str(job), check=False)
