"""The launch layer without a cluster: times, profiles, sbatch rendering, cluster checks, the job
plan that both --dry-run and submit use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avts_dist.cli import main as avts_main
from avts_dist.config import ConfigError, LaunchConfig, load_config
from eval.registry import JOBS, EvalError, parse_suite
from launch import executors, jobs, plan
from launch.evaljobs import ExportJob, array_items, eval_jobs_for
from launch.profiles import load_profile, profile_overrides, resolve_launch_config


@pytest.mark.parametrize(
    "text, minutes",
    [
        ("5", 5),
        ("30:00", 30),
        ("01:30:00", 90),
        ("72:00:00", 4320),
        ("1-00:00:00", 1440),
        ("2-12", 3600),
        ("00:00:30", 0.5),
        ("UNLIMITED", None),
    ],
)
def test_parse_slurm_time(text, minutes):
    assert executors.parse_slurm_time(text) == minutes


def test_time_minutes_rounds_up_and_refuses_zero():
    assert executors.time_minutes("00:00:30") == 1
    with pytest.raises(executors.LaunchError, match="impossible"):
        executors.time_minutes("00:00:00")
    with pytest.raises(executors.LaunchError, match="not a SLURM time"):
        executors.time_minutes("ten minutes")


def test_check_options_grace_and_tasks():
    executors.check_options(LaunchConfig(time="00:10:00", grace_s=60))
    with pytest.raises(executors.LaunchError, match="grace_s"):
        executors.check_options(LaunchConfig(time="1", grace_s=60))
    with pytest.raises(executors.LaunchError, match="one task per GPU"):
        executors.check_options(LaunchConfig(gpus_per_node=8, tasks_per_node=4))
    with pytest.raises(ConfigError, match="launch.signal"):
        load_config(None, ["launch.signal=KILL"])
    with pytest.raises(ConfigError, match="launch.cluster"):
        load_config(None, ["launch.cluster=kubernetes"])


def _parts(**over):
    part = executors.Partition(
        name="gpu",
        max_time_min=60.0,
        total_nodes=4,
        total_cpus=64,
        state="UP",
        default=True,
        has_gpus=True,
        raw={"MaxTime": "01:00:00"},
    )
    for k, v in over.items():
        setattr(part, k, v)
    return {"gpu": part}


@pytest.mark.parametrize(
    "launch, message",
    [
        (LaunchConfig(partition="cpu"), "unknown partition 'cpu'"),
        (LaunchConfig(time="02:00:00"), "exceeds partition 'gpu'"),
        (LaunchConfig(nodes=8), "8 nodes requested"),
        (LaunchConfig(tasks_per_node=8, cpus_per_task=10), "CPUs requested"),
    ],
)
def test_check_against_cluster_refuses(launch, message):
    with pytest.raises(executors.LaunchError, match=message):
        executors.check_against_cluster(launch, _parts())


def test_check_against_cluster_gpu_on_cpu_partition_and_default():
    with pytest.raises(executors.LaunchError, match="has no GPUs"):
        executors.check_against_cluster(LaunchConfig(gpus_per_node=1), _parts(has_gpus=False))
    part = executors.check_against_cluster(LaunchConfig(gpus_per_node=8, time="30"), _parts())
    assert part.name == "gpu"  # the default partition when none is named


def test_slurm_parameters_one_task_per_gpu_and_signal():
    launch = LaunchConfig(
        nodes=64, gpus_per_node=8, partition="gpu", time="72:00:00", mem="0", signal="USR1"
    )
    p = executors.slurm_parameters(launch, "big", dependency="afterok:7")
    assert p["ntasks_per_node"] == 8 and p["gpus_per_node"] == 8 and p["nodes"] == 64
    assert p["time"] == 4320
    assert p["additional_parameters"] == {"signal": "USR1@120", "mem": "0"}
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in p["setup"]
    cpu = executors.slurm_parameters(LaunchConfig(tasks_per_node=4), "cpu")
    assert cpu["ntasks_per_node"] == 4 and "gpus_per_node" not in cpu


def test_dry_run_64_nodes_by_8_gpus(tmp_path, capsys, monkeypatch):
    # No cluster: what is printed comes from the config and submitit's own sbatch renderer.
    monkeypatch.setattr(executors, "slurm_available", lambda: False)
    cfg = tmp_path / "big.yaml"
    cfg.write_text(f"run:\n  name: big\n  dir: {tmp_path / 'big'}\n")
    status = avts_main(
        [
            "launch",
            "pretrain",
            "--config",
            str(cfg),
            "--nodes",
            "64",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--time",
            "72:00:00",
            "--account",
            "vision",
            "--exclusive",
            "--eval-suite",
            "sync,ucf101",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    for line in (
        "#SBATCH --nodes=64",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "#SBATCH --exclusive",
        "#SBATCH --time=4320",
        "#SBATCH --signal=USR2@120",
        "# WORLD_SIZE=512",
        "# LOCAL_WORLD_SIZE=8",
        "# backend=cpu:gloo,cuda:nccl",
        "--kill-on-bad-exit=1",
        "#SBATCH --dependency='afterok:<pretrain job id>'",
        "#SBATCH --array=0-2%3",  # ucf101's three splits
        "resume: auto",
    ):
        assert line in out, line
    assert not (tmp_path / "big").exists(), "a dry run writes nothing"


def test_profiles_load_and_layer(tmp_path):
    local = load_profile("local")
    assert local["partition"] == "debug" and local["gpus_per_node"] == 0
    assert "launch.time=00:30:00" in profile_overrides("local")
    bad = tmp_path / "bad.yaml"
    bad.write_text("partitoin: gpu\n")
    with pytest.raises(ConfigError, match="partitoin"):
        load_profile(str(bad))
    with pytest.raises(ConfigError, match="unknown cluster profile"):
        load_profile("nosuch")


def test_profile_then_flags_precedence(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(executors, "slurm_available", lambda: False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run:\n  name: c\n  dir: {tmp_path / 'c'}\nlaunch:\n  partition: fromyaml\n")
    argv = ["launch", "pretrain", "--config", str(cfg), "--profile", "example_gpu_cluster"]
    assert avts_main([*argv, "--nodes", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # profile beats the YAML, flags beat the profile
    assert "#SBATCH --partition=gpu" in out and "#SBATCH --nodes=2" in out
    assert "#SBATCH --cpus-per-task=10" in out


def test_eval_suite_parsing_and_arrays():
    assert parse_suite("sync, ucf101") == ["sync", "ucf101"]
    with pytest.raises(EvalError, match="unknown evaluation"):
        parse_suite("sync,imagenet")
    assert array_items("ucf101", [1, 2, 3]) == [1, 2, 3]
    assert array_items("esc50", [1, 2, 3]) == [None]
    jobs = eval_jobs_for(
        ["sync", "hmdb51"], "/m.pt", splits=[1, 2], overrides=["eval.seed=3"], parent_run_id="abc"
    )
    assert len(jobs["sync"]) == 1 and len(jobs["hmdb51"]) == 2
    second = jobs["hmdb51"][1]
    assert (second.name, second.checkpoint, second.parent()) == ("hmdb51", "/m.pt", "abc")
    assert second.overrides == ["eval.seed=3", "eval.splits=[2]"]
    assert jobs["sync"][0].overrides == ["eval.seed=3"]


def test_one_eval_registry_for_eval_and_launch(capsys):
    """`avts eval` choices, `avts launch --suite` and the job arrays all come from JOBS."""
    with pytest.raises(SystemExit):
        avts_main(["eval", "--help"])
    assert "{" + ",".join(JOBS) + "}" in capsys.readouterr().out
    assert parse_suite(",".join(JOBS)) == list(JOBS)  # synthetic included: launchable too
    arrays = {name for name, spec in JOBS.items() if spec.array_over_splits}
    assert arrays == {"ucf101", "hmdb51", "multimodal"}


def _plan_config(tmp_path, *overrides):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"run:\n  name: p\n  dir: {tmp_path / 'p'}\n")
    return resolve_launch_config(str(cfg), list(overrides), flags={"partition": "gpu"})


def test_pretrain_plan_chains_export_and_eval_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "slurm_available", lambda: False)
    cfg = _plan_config(tmp_path, "eval.splits=[1,3]")
    jobs = plan.pretrain_plan(cfg, eval_suite="sync,ucf101", eval_time="00:20:00", dry_run=True)
    assert [j.key for j in jobs.jobs] == ["pretrain", "export", "eval-sync", "eval-ucf101"]
    assert [j.after for j in jobs.jobs] == [None, "pretrain", "export", "export"]
    assert [len(j.tasks) for j in jobs.jobs] == [1, 1, 1, 2]
    pretrain, export, _, ucf = jobs.jobs
    assert pretrain.tasks[0].config["resume"] == "auto" and pretrain.distributed
    assert isinstance(export.tasks[0], ExportJob)
    assert export.tasks[0].out == str(tmp_path / "p" / "export" / "model.pt")
    assert [t.overrides for t in ucf.tasks] == [["eval.splits=[1]"], ["eval.splits=[3]"]]
    assert ucf.tasks[0].checkpoint == export.tasks[0].out
    assert ucf.tasks[0].parent_run_dir == str(tmp_path / "p")
    assert ucf.launch.time == "00:20:00" and ucf.launch.tasks_per_node == 1
    assert cfg.resume == "none", "the plan works on its own copy of the config"
    # Dependencies: placeholders in the dry run, the predecessor's real id when submitting.
    assert jobs.dependency(ucf, {}) == "afterok:<export job id>"
    assert jobs.dependency(ucf, {"pretrain": "7", "export": "8"}) == "afterok:8"
    text = plan.render(jobs)
    assert text.count("#SBATCH --dependency=") == 3
    assert "#SBATCH --array=0-1%2" in text and "#SBATCH --job-name=p-eval-ucf101" in text


def test_plan_refuses_before_submitting(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "slurm_available", lambda: False)
    cfg = _plan_config(tmp_path, "launch.cluster=local")
    with pytest.raises(executors.LaunchError, match="needs --cluster slurm"):
        plan.pretrain_plan(cfg, eval_suite="sync", dry_run=True)
    with pytest.raises(executors.LaunchError, match="--eval-suite: unknown evaluation"):
        plan.pretrain_plan(_plan_config(tmp_path), eval_suite="sync,nope", dry_run=True)
    with pytest.raises(executors.LaunchError, match="--after needs --cluster slurm"):
        plan.eval_plan(cfg, "/m.pt", "sync", after="5", dry_run=True)


def test_cli_bad_options_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(executors, "slurm_available", lambda: False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  name: c\n")
    assert avts_main(["launch", "pretrain", "--config", str(cfg), "--time", "0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "launch.time" in err and "Traceback" not in err
    # Without a dry run and without SLURM: refused before anything is written.
    assert avts_main(["launch", "pretrain", "--config", str(cfg)]) == 2
    assert "no SLURM client" in capsys.readouterr().err


def test_array_state_is_done_only_when_every_task_is():
    combined = jobs.combined_state
    assert combined(["COMPLETED", "RUNNING"]) == "RUNNING"
    assert combined(["COMPLETED", "FAILED"]) == "FAILED"
    assert combined(["COMPLETED", "COMPLETED"]) == "COMPLETED"
    assert combined([]) == "UNKNOWN"


def test_launch_eval_dry_run_dependency_and_arrays(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(executors, "slurm_available", lambda: False)
    argv = ["launch", "eval", "--checkpoint", str(tmp_path / "model.pt")]
    argv += ["--suite", "sync,ucf101", "--after", "123", "--partition", "gpu", "--dry-run"]
    assert avts_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --dependency=afterok:123") == 2
    assert "#SBATCH --job-name=eval-ucf101" in out and "#SBATCH --array=0-2%3" in out
    assert "#SBATCH --ntasks-per-node=1" in out
    assert avts_main([*argv[:4], "--suite", "sync,nope", "--dry-run"]) == 2
    assert "unknown evaluation" in capsys.readouterr().err


def test_pretrain_job_checkpoint_counts_requeues_and_resumes():
    from launch.pretrain import PretrainJob

    job = PretrainJob({"resume": "none"}, max_requeues=2, num_requeues=1)
    nxt = job.checkpoint()
    assert nxt.function.num_requeues == 2 and nxt.function.config["resume"] == "auto"
    assert job.config["resume"] == "none"  # the running job's own state is left alone
    assert nxt.function.checkpoint() is None  # the bound is reached: no more requeues


# A GPU cluster as `sinfo -h -o '%P|%c|%G'` prints it: two node shapes in "gpu" (the default),
# GPUs with a type and socket binding, a CPU partition.
SINFO_SAMPLE = """gpu*|96|gpu:h100:8(S:0-1)
gpu*|64|gpu:a100:8(S:0-1),shard:16
cpu|128|(null)
"""


def test_sinfo_cpus_per_gpu_parsed():
    shapes = executors.parse_sinfo_cpus_gpus(SINFO_SAMPLE)
    assert shapes["gpu"] == [(96, 8), (64, 8)] and shapes[""] == shapes["gpu"]
    assert shapes["cpu"] == [(128, 0)]
    # The smallest node shape decides: a job may land on any node of the partition.
    assert executors.cpus_per_gpu(shapes["gpu"]) == 8
    assert executors.cpus_per_gpu(shapes["cpu"]) is None


@pytest.mark.parametrize(
    "launch, workers, cpus, note, warned",
    [
        (LaunchConfig(gpus_per_node=8), 6, 8, "CPUs per GPU of the default partition", False),
        (LaunchConfig(gpus_per_node=8, partition="gpu"), 10, 8, "'gpu'", True),
        (LaunchConfig(gpus_per_node=8, cpus_per_task=12), 10, 12, "launch.cpus_per_task", False),
        (LaunchConfig(gpus_per_node=0), 2, 1, "no GPUs", True),
        (LaunchConfig(gpus_per_node=8, partition="cpu"), 0, 1, "no CPUs per GPU", False),
    ],
)
def test_cpus_per_task_defaults_to_cpus_per_gpu(launch, workers, cpus, note, warned):
    shapes = executors.parse_sinfo_cpus_gpus(SINFO_SAMPLE)
    chosen, warning = executors.settle_cpus_per_task(launch, workers, shapes)
    assert launch.cpus_per_task == cpus and note in chosen
    assert bool(warning) == warned
    if warned:
        assert f"data.num_workers={workers} exceeds launch.cpus_per_task={cpus}" in warning


def test_dry_run_shows_cpus_per_task_and_warns_on_workers(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(executors, "slurm_available", lambda: False)
    sample = executors.parse_sinfo_cpus_gpus(SINFO_SAMPLE)
    monkeypatch.setattr(executors, "query_cpus_gpus", lambda: sample)
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"run: {{name: w, dir: {tmp_path / 'w'}}}\ndata: {{num_workers: 12}}\n")
    argv = ["launch", "pretrain", "--config", str(cfg), "--gpus-per-node", "8", "--dry-run"]
    assert avts_main(argv) == 0
    out, err = capsys.readouterr()
    assert "#SBATCH --cpus-per-task=8" in out
    assert "# cpus per task: 8 (CPUs per GPU of the default partition" in out
    assert "data.num_workers: 12 per rank" in out
    assert err.count("data.num_workers=12 exceeds launch.cpus_per_task=8") == 1
    assert avts_main([*argv, "--cpus-per-task", "16"]) == 0
    out, err = capsys.readouterr()
    assert "#SBATCH --cpus-per-task=16" in out and "exceeds" not in err


def test_one_waiter_for_plain_jobs_and_arrays(monkeypatch):
    """launch.jobs.wait_for_jobs over scontrol's answers, poll by poll: an array's pending range
    splits into elements, a dependency never met is cancelled, a requeue is said, an element
    SLURM forgot counts as ended (GONE), and a plain job is named by its id."""
    polls = iter(
        [
            {"7": [{"JobId": "7", "JobState": "RUNNING"}],
             "8": [{"ArrayJobId": "8", "ArrayTaskId": "0-1", "JobState": "PENDING",
                    "Reason": "Dependency"}]},
            {"7": [{"JobId": "7", "JobState": "PENDING", "Restarts": "1"}],
             "8": [{"ArrayTaskId": "0", "JobState": "COMPLETED"},
                   {"ArrayTaskId": "1", "JobState": "PENDING",
                    "Reason": "DependencyNeverSatisfied"}]},
            {"7": [], "8": [{"ArrayTaskId": "0", "JobState": "COMPLETED"},
                            {"ArrayTaskId": "1", "JobState": "CANCELLED"}]},
        ]
    )  # fmt: skip
    answers: dict = {}

    def job_states(job_id, timeout_s=15.0):
        if job_id == "7":
            answers.update(next(polls))
        return answers[job_id]

    cancelled, said = [], []
    monkeypatch.setattr(jobs, "job_states", job_states)
    monkeypatch.setattr(jobs, "cancel", cancelled.append)
    final = jobs.wait_for_jobs({"7": 1, "8": 2}, echo=said.append, poll_s=0)
    assert final == {"7": "GONE", "8_0": "COMPLETED", "8_1": "CANCELLED"}
    assert cancelled == ["8_1"]
    assert "job 7: RUNNING" in said and "job 7: PENDING (requeued 1x)" in said
    assert "job 8_1: PENDING" in said
    assert "job 8_1: a job it depends on failed; cancelled" in said
    assert jobs.job_outcomes({"7": 1, "8": 2}, final) == {"7": "GONE", "8": "CANCELLED"}
    assert jobs.element_name("8", 1, 2) == "8_1" and jobs.element_name("7", 0, 1) == "7"


def test_array_task_ids_of_pending_ranges():
    assert jobs.task_ids("3") == [3]
    assert jobs.task_ids("0-3%2") == [0, 1, 2, 3]
    assert jobs.task_ids("1,4-5") == [1, 4, 5]
    assert jobs.task_ids("") == []


def test_dry_run_srun_line_carries_cpus_per_task_and_the_interface(tmp_path, capsys, monkeypatch):
    # SLURM 22.05-23.02's srun ignores the allocation's --cpus-per-task: the srun line and the
    # script's environment must carry it, or each bound task gets one CPU.
    monkeypatch.setattr(executors, "slurm_available", lambda: False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{name: c, dir: {tmp_path / 'c'}}}\n")
    argv = ["launch", "pretrain", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "8",
            "--cpus-per-task", "10", "--network-interface", "ib0", "--dry-run"]  # fmt: skip
    assert avts_main(argv) == 0
    out = capsys.readouterr().out
    srun = [line for line in out.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "--cpus-per-task=10" in srun[0].split(), srun
    for line in ("#SBATCH --cpus-per-task=10", "export SRUN_CPUS_PER_TASK=10",
                 "export GLOO_SOCKET_IFNAME=ib0", "export NCCL_SOCKET_IFNAME=ib0"):  # fmt: skip
        assert line in out.splitlines(), line
    assert avts_main(argv[:-3] + ["--dry-run"]) == 0  # no interface named: none exported
    assert "SOCKET_IFNAME" not in capsys.readouterr().out


def _fake_scontrol(tmp_path, monkeypatch, script: str) -> Path:
    """A stand-in ``scontrol`` first on PATH: a busy controller cannot be made on demand with
    the real local cluster, so these tests replay its answers (each call appends to calls.log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "scontrol"
    exe.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/calls.log\n{script}\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path / "calls.log"


def test_requeue_outlasts_a_controller_that_times_out(tmp_path, monkeypatch):
    """Rank 0 asks for the job's state and requeues it: a controller that does not answer at
    first (one CI run: the preempted job ended FAILED, not requeued) is asked again; a job that
    is no longer running is not requeued; a requeue whose answer was lost counts as done."""
    from launch import pretrain

    calls = _fake_scontrol(
        tmp_path,
        monkeypatch,
        'n=$(wc -l < "$(dirname "$0")/../calls.log")\n'
        'case "$1" in\n'
        '  show) [ "$n" -le 2 ] && { echo "Socket timed out on send/recv" >&2; exit 1; }\n'
        '        echo "JobId=5 JobState=$(cat "$(dirname "$0")/../state")" ;;\n'
        '  requeue) [ "$n" -le 4 ] && { echo "Socket timed out" >&2; exit 1; }\n'
        '           grep -q RUNNING "$(dirname "$0")/../state" && exit 0\n'
        '           echo "Job has already finished" >&2; exit 1 ;;\n'
        "esac",
    )
    (tmp_path / "state").write_text("RUNNING")
    assert pretrain._job_state_settled("5", pause_s=0) == "RUNNING"  # calls 1-3
    assert pretrain._scontrol_requeue("5", pause_s=0) == ""  # requeue fails, show, requeue takes
    assert [c.split()[0] for c in calls.read_text().splitlines()] == [
        "show", "show", "show", "requeue", "show", "requeue"
    ]  # fmt: skip
    calls.write_text("")
    assert pretrain._job_state_settled("5", attempts=2, pause_s=0) == "UNKNOWN"
    # A refusal of a job that ended is final; a lost answer of a requeue that took is success.
    (tmp_path / "state").write_text("CANCELLED")
    calls.write_text("x\nx\nx\nx\nx\n")
    error = pretrain._scontrol_requeue("5", pause_s=0)
    assert error.endswith("(job is CANCELLED)") and calls.read_text().count("requeue") == 1
    (tmp_path / "state").write_text("PENDING")
    calls.write_text("x\n")  # requeue fails (n<=4), then the job shows PENDING: it took
    assert pretrain._scontrol_requeue("5", pause_s=0) == ""
