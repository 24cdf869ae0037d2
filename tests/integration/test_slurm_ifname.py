"""``launch.network_interface`` on the two network-namespace nodes (local_slurm.sh mn-up): the job
script's exports (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``, from the launcher's own
``slurm_parameters``) decide which interface gloo binds. Naming the veth between the nodes
(``avts0``), a 2-node all-reduce works; naming loopback, which the namespaces do not share, it
cannot connect: so the export reaches the ranks and is what gloo uses."""

from __future__ import annotations

import ast
import sys

import pytest

from avts_dist.config import LaunchConfig
from launch import executors
from tests.integration.test_slurm_multinode import REPO, _mn, two_node_cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RANK = (
    "import datetime, os, torch, torch.distributed as d; "
    "d.init_process_group('gloo', init_method='env://', rank=int(os.environ['SLURM_PROCID']), "
    "world_size=2, timeout=datetime.timedelta(seconds={timeout})); t = torch.ones(1); "
    "d.all_reduce(t); print('rank', d.get_rank(), 'sum', t.item(), 'via', "
    "os.environ['GLOO_SOCKET_IFNAME'], flush=True); d.barrier(); d.destroy_process_group()"
)
# The barrier and destroy_process_group: without them a rank that exits first can close its gloo
# pair while the other's still open, which aborts it at exit ("terminate called without an
# active exception"; one fresh-clone run, after both ranks had printed their sums).


def _job(tmp_path, interface: str, port: int, timeout_s: int) -> str:
    """Runs the 2-node job; its final state. Polled every 0.5 s (launch.jobs.wait_for_jobs):
    `sbatch --wait` polls after 2, 8, then every 32 s (MinJobAge is 600 s here), which cost this
    test 30 s of waiting."""
    setup = executors.slurm_parameters(LaunchConfig(nodes=2, network_interface=interface), "if")
    exports = [line for line in setup["setup"] if "SOCKET_IFNAME" in line]
    assert len(exports) == 2
    script = tmp_path / f"{interface}.sh"
    script.write_text(
        "#!/bin/bash\n"
        + "\n".join(exports)
        + f"\nexport MASTER_ADDR=10.77.0.1 MASTER_PORT={port}\n"
        + f'srun --kill-on-bad-exit=1 {sys.executable} -c "{RANK.format(timeout=timeout_s)}"\n'
    )
    submit = _mn(
        "env", f"PYTHONPATH={REPO}", "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
        "--time=3", f"--chdir={tmp_path}", f"--output={tmp_path}/{interface}.out", str(script),
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    # The project's job waiter, run inside n1's namespace where the cluster's clients reach it.
    wait = (
        f"from launch.jobs import wait_for_jobs; print(wait_for_jobs({{{job!r}: 1}}, poll_s=0.5))"
    )
    waited = _mn(sys.executable, "-c", wait, timeout=300)
    assert waited.returncode == 0, waited.stderr
    return ast.literal_eval(waited.stdout.strip().splitlines()[-1])[job]


def test_the_named_interface_is_the_one_gloo_binds(two_node_cluster, tmp_path):  # noqa: F811
    state = _job(tmp_path, "avts0", 29561, timeout_s=60)
    out = (tmp_path / "avts0.out").read_text()
    assert state == "COMPLETED", out
    assert sorted(ln for ln in out.splitlines() if ln.startswith("rank ")) == [
        "rank 0 sum 2.0 via avts0",
        "rank 1 sum 2.0 via avts0",
    ]
    # The nodes share no loopback: no pair connects. Both ranks reach the store on the veth
    # (MASTER_ADDR); gloo's pair to the peer's 127.0.0.1 is refused until the 10 s timeout
    # (ranks start within a second of each other; the avts0 job above takes under 10 s in all).
    state = _job(tmp_path, "lo", 29562, timeout_s=10)
    out = (tmp_path / "lo.out").read_text()
    assert state == "FAILED" and "sum" not in out, out
    assert "connectFullMesh failed" in out and "remote=[127.0.0.1]" in out, out[-3000:]
