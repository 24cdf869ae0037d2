"""Running a study's plan: the corpus, then the pretrainings and their evaluations, in this
process (``--cluster debug``) or as job arrays on the local SLURM cluster (``--cluster local``)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avts_dist.config import ConfigError, redacted_config_dict, secrets_in_environment
from avts_dist.data.synthetic import synthesize
from launch import executors
from launch.evaljobs import EvalJob
from launch.jobs import GONE, element_name, wait_for_jobs
from launch.pretrain import PretrainJob
from launch.study.plan import (
    EvalUnit,
    PretrainUnit,
    StudyPlan,
    array_launch,
    finished_checkpoint_step,
    job_arrays,
    synth_argv,
)
from launch.study.records import eval_finished, eval_record, pretrain_record, write_record

__all__ = [
    "NOT_RUN",
    "StudyEvals",
    "check_not_running",
    "execute",
    "jobs_in_slurm",
    "summary_lines",
    "write_corpus",
]


@dataclass
class StudyEvals:
    """One array element: the evaluations of one pretrained net, in order; each skipped when its
    results exist (a re-run), each failure kept while the others go on."""

    unit_key: str
    run_dir: str
    evals: list[tuple[str, str, list[str], str]]  # (name, job, overrides, metrics file)

    def __call__(self) -> dict[str, str]:
        states: dict[str, str] = {}
        failures = []
        for name, job, overrides, metrics_file in self.evals:
            if eval_finished(metrics_file, job, overrides):
                states[name] = "reused"
                continue
            try:
                EvalJob(
                    job, str(Path(self.run_dir) / "checkpoints"), overrides,
                    parent_run_dir=self.run_dir,
                )()  # fmt: skip
                write_record(Path(metrics_file).parent.parent, eval_record(job, overrides))
                states[name] = "completed"
            except Exception as exc:  # noqa: BLE001  one evaluation's failure: the others go on
                failures.append(f"{name}: {type(exc).__name__}: {_last_line(exc)}")
                states[name] = "failed"
        if failures:
            raise RuntimeError(f"{self.unit_key}: evaluation(s) failed: " + "; ".join(failures))
        return states


def _study_evals(unit: PretrainUnit) -> StudyEvals:
    return StudyEvals(
        unit.key,
        str(unit.run_dir),
        [(e.name, e.job, e.overrides, str(e.metrics_file)) for e in unit.evals],
    )


def _pretrain_job(unit: PretrainUnit) -> PretrainJob:
    assert unit.config is not None
    return PretrainJob(
        redacted_config_dict(unit.config), max_requeues=unit.config.launch.max_requeues
    )


def write_corpus(p: StudyPlan, echo: Callable[[str], None]) -> None:
    """The corpus through :func:`synthesize` (what ``avts synth`` calls), unless it exists."""
    if p.corpus_exists:
        return
    options = dataclasses.asdict(p.study.check_corpus())
    url = options.pop("out")
    options["num_workers"] = max(1, options["num_workers"])
    echo("writing the corpus: avts " + " ".join(synth_argv(p.study)))
    started = time.monotonic()
    try:
        index = synthesize(url, **options, progress=sys.stderr.isatty())
    except ValueError as exc:
        raise ConfigError(f"corpus: {exc}") from None
    num_ok = int((index.status == "ok").sum())
    echo(
        f"wrote {len(index)} clips ({num_ok} ok) in {len(index.shards)} shards to {url} "
        f"in {time.monotonic() - started:.1f}s"
    )


def execute(p: StudyPlan, echo: Callable[[str], None], wait: bool = True) -> dict[str, str]:
    """Runs what the plan left to do; unit or eval key -> final state (reused ones included)."""
    check_not_running(p)
    write_corpus(p, echo)
    for u in p.units:
        if not u.reused:  # before it runs: an interrupted run is checked against it next time
            write_record(u.run_dir, pretrain_record(u.config))
    states = {u.key: "reused" for u in p.units if u.reused}
    for u in p.units:
        states.update({f"{u.key}/{e.name}": "reused" for e in u.evals if e.reused})
    if p.cluster == "debug":
        states.update(_run_debug(p, echo))
    else:
        states.update(_run_slurm(p, echo, wait))
    return states


def _run_debug(p: StudyPlan, echo: Callable[[str], None]) -> dict[str, str]:
    """The job callables called here, one after the other. Not through submitit's debug
    executor: it opens pdb on a failure, and a failed element must not stop the others. The
    process group of one stays up between pretrainings (init_distributed reuses it; DeepSpeed
    keeps groups of it cached)."""
    states = {}
    for unit in p.units:
        if not unit.reused:
            echo(f"pretrain {unit.key}: running in-process")
            try:
                _pretrain_job(unit)()
                states[unit.key] = "COMPLETED"
            except Exception as exc:  # noqa: BLE001  a failed element does not stop the others
                states[unit.key] = "FAILED"
                echo(f"pretrain {unit.key}: failed: {_last_line(exc)}")
        todo = [e for e in unit.evals if not e.reused]
        if not todo:
            continue
        if states.get(unit.key) == "FAILED":
            states.update({f"{unit.key}/{e.name}": NOT_RUN for e in todo})
            continue
        echo(f"evaluations of {unit.key}: {', '.join(e.name for e in todo)}")
        try:
            _study_evals(unit)()
        except Exception as exc:  # noqa: BLE001
            echo(_last_line(exc))
        states.update({f"{unit.key}/{e.name}": _eval_state(e) for e in todo})
    return states


NOT_RUN = "NOT RUN (pretraining failed)"


def _eval_state(ev: EvalUnit) -> str:
    return "COMPLETED" if ev.finished else "FAILED"


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def jobs_in_slurm(folder: Path) -> list[str]:
    """Ids of pending or running SLURM jobs submitted from this study's job folder."""
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%o"], capture_output=True, text=True, timeout=30, check=False
    )
    prefix = str(folder).rstrip("/") + "/"
    return [
        line.split("|", 1)[0]
        for line in out.stdout.splitlines()
        if "|" in line and line.split("|", 1)[1].startswith(prefix)
    ]


def check_not_running(p: StudyPlan) -> None:
    """A study still in SLURM (an earlier `avts study` left waiting, or --no-wait) is not
    submitted again: two jobs would train into the same run dir."""
    if p.cluster != "local":
        return
    running = jobs_in_slurm(p.study.runs_dir / "slurm")
    if running:
        raise ConfigError(
            f"study {p.study.name} still has SLURM jobs {', '.join(running)} "
            f"(from {p.study.runs_dir / 'slurm'}): wait for them (squeue) or scancel them, "
            "then run it again"
        )


def _run_slurm(p: StudyPlan, echo: Callable[[str], None], wait: bool) -> dict[str, str]:
    ids: dict[str, str] = {}
    elements: dict[str, list[PretrainUnit]] = {}
    with secrets_in_environment(p.units[0].config):
        for key, units, dep in job_arrays(p):
            launch = array_launch(units[0].config, p.study, key)
            dependency = f"{dep}:{ids['pretrain']}" if dep else None
            ex = executors.make_executor(
                launch,
                launch.folder,
                f"{p.study.name}-{key}",
                dependency=dependency,
                max_requeues=None if key == "pretrain" else 0,
            )
            with ex.batch():
                jobs = [
                    ex.submit(_pretrain_job(u) if key == "pretrain" else _study_evals(u))
                    for u in units
                ]
            ids[key] = jobs[0].job_id.split("_")[0]
            elements[key] = units
            echo(
                f"submitted job array {ids[key]} ({p.study.name}-{key}, {len(units)} element(s))"
                + (f", dependency {dependency}" if dependency else "")
            )
    if not ids:
        return {}
    if not wait:
        return {f"{k}/{ids[k]}": "SUBMITTED" for k in ids}
    arrays = {ids[k]: len(elements[k]) for k in ids}
    final = wait_for_jobs(arrays, echo, poll_s=3.0)
    states = {}
    for key, units in elements.items():
        for i, unit in enumerate(units):
            state = final.get(element_name(ids[key], i, len(units)), "UNKNOWN")
            if key == "pretrain":
                done = finished_checkpoint_step(unit.config) == unit.config.train.max_steps
                states[unit.key] = "COMPLETED" if state == GONE and done else state
                continue
            for e in unit.evals:
                if e.reused:
                    continue
                done = e.finished
                states[f"{unit.key}/{e.name}"] = (
                    "COMPLETED" if done else (NOT_RUN if state == "CANCELLED" else "FAILED")
                )
    return states


def summary_lines(states: dict[str, str]) -> tuple[list[str], list[str]]:
    """The per-unit lines and the failures among them."""
    lines = [f"  {key:40s} {state}" for key, state in states.items()]
    failed = [k for k, s in states.items() if s not in ("reused", "COMPLETED", "SUBMITTED")]
    return lines, failed
