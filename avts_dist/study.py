"""``avts study``: the protocol of docs/results.md as one command.

A study YAML (``configs/study/*.yaml``, schema :class:`StudyConfig`) names the corpus (the
``avts synth`` options, written once), the base pretraining config, the arms (name -> config
overrides), the pretraining seeds and the evaluations of each pretrained net. :func:`expand`
turns it into units of work (arms x seeds pretrainings, each with its evaluations);
:func:`plan` resolves every unit's config (bad keys fail here, before anything runs) and marks
what a previous invocation already finished (reuse); :func:`execute` runs what is left through
the launch layer:

- ``--cluster local``: the local SLURM cluster, as two job arrays: the pretrainings, and one
  evaluation element per pretraining with ``aftercorr`` on it (element i starts when
  pretraining i completed; a failed pretraining's element is cancelled, the others go on).
  Evaluations of reused pretrainings form a third array with no dependency.
- ``--cluster debug``: everything in this process, serially, through submitit's debug executor.

Every run carries ``tracking.tags`` ``avts.study``, ``avts.arm``, ``avts.pretrain_seed`` (and
``avts.study_eval`` on evaluations), all in one MLflow experiment named after the study, which is
what ``avts compare --study NAME`` searches.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avts_dist.config import (
    Config,
    ConfigError,
    _fail,
    flatten_config,
    load_config,
    redacted_config_dict,
)
from avts_dist.storage import atomic_write_text

__all__ = [
    "ArmConfig",
    "EvalUnit",
    "PretrainUnit",
    "StudyConfig",
    "StudyEvalConfig",
    "StudyEvals",
    "StudyPlan",
    "execute",
    "expand",
    "load_study",
    "plan",
    "render_plan",
    "tracking_uri",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ---------------------------------------------------------------------------------------------
# The study config


@dataclass
class ArmConfig:
    # Config overrides (key=value) of this arm over the base pretraining config.
    overrides: list[str] = field(default_factory=list)


@dataclass
class StudyEvalConfig:
    # An evaluation job of eval/registry.py (sync, lowlabel, ...).
    job: str = ""
    # Config overrides (key=value) of the evaluation; eval.seed is the pretraining seed p.
    overrides: list[str] = field(default_factory=list)
    # The arms whose pretrained nets it evaluates (explicit; [] turns it off).
    arms: list[str] = field(default_factory=list)
    # Extra overrides for some arms (e.g. the scratch baseline only on `avts`).
    arm_overrides: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class StudyLaunchConfig:
    # SLURM time limit of one pretraining and of one pretraining's evaluations.
    time: str = "02:00:00"
    eval_time: str = "02:00:00"
    cpus_per_task: int = 1


@dataclass
class StudyConfig:
    name: str = ""
    # `avts synth` options (long names with _ for -), `out` included; written once, reused when
    # its index exists.
    corpus: dict[str, Any] = field(default_factory=dict)
    # The base pretraining config every arm starts from, and overrides common to all arms.
    pretrain_config: str = "configs/pretrain/quickstart.yaml"
    overrides: list[str] = field(default_factory=list)
    arms: dict[str, ArmConfig] = field(default_factory=dict)
    # Pretraining seeds p; each sets every key of seed_keys.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_keys: list[str] = field(default_factory=lambda: ["data.seed", "loss.seed"])
    evals: dict[str, StudyEvalConfig] = field(default_factory=dict)
    # Parent folder of the run dirs (default runs/study_<name>); MLflow store (default ./mlruns).
    runs: str = ""
    tracking_uri: str = ""
    launch: StudyLaunchConfig = field(default_factory=StudyLaunchConfig)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name or ""):
            _fail("name", f"a study name of letters, digits, _ . - is required, got {self.name!r}")
        if not self.corpus.get("out"):
            _fail("corpus.out", "the corpus URL is required")
        if not self.arms:
            _fail("arms", "at least one arm is required")
        for arm in self.arms:
            if not _NAME.fullmatch(arm) or arm == "scratch":
                _fail(f"arms.{arm}", "arm names are letters, digits, _ . - (and not 'scratch')")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            _fail("seeds", f"distinct pretraining seeds expected, got {self.seeds}")
        if not self.seed_keys:
            _fail("seed_keys", "at least one config key must take the pretraining seed")
        for name, ev in self.evals.items():
            if not _NAME.fullmatch(name):
                _fail(f"evals.{name}", "eval names are letters, digits, _ . -")
            if not ev.job:
                _fail(f"evals.{name}.job", "an evaluation job name is required")
            for key, arms in (("arms", ev.arms), ("arm_overrides", list(ev.arm_overrides))):
                unknown = sorted(set(arms) - set(self.arms))
                if unknown:
                    _fail(
                        f"evals.{name}.{key}", f"unknown arm(s) {unknown}; arms: {list(self.arms)}"
                    )
        if self.launch.cpus_per_task < 1:
            _fail("launch.cpus_per_task", "must be >= 1")

    @property
    def runs_dir(self) -> Path:
        return Path(self.runs or f"runs/study_{self.name}").resolve()


def load_study(path: str, overrides: list[str] | None = None) -> StudyConfig:
    """The typed study config; ConfigError naming the key for anything unknown or invalid."""
    return load_config(path, overrides, schema=StudyConfig)


# ---------------------------------------------------------------------------------------------
# Units of work


@dataclass
class EvalUnit:
    name: str  # the study's eval name
    job: str
    overrides: list[str]
    out_dir: Path
    reused: bool = False
    # Results exist but were made with other overrides (its record differs): run again.
    stale: bool = False

    @property
    def metrics_file(self) -> Path:
        # eval/run.py writes it last, after the job's own results: present = finished.
        return self.out_dir / self.job / "metrics.json"

    @property
    def finished(self) -> bool:
        return eval_finished(self.metrics_file, self.job, self.overrides)


@dataclass
class PretrainUnit:
    arm: str
    seed: int
    run_dir: Path
    overrides: list[str]
    evals: list[EvalUnit] = field(default_factory=list)
    config: Config | None = None  # resolved by plan()
    reused: bool = False

    @property
    def key(self) -> str:
        return f"{self.arm}/p{self.seed}"

    @property
    def tags(self) -> dict[str, str]:
        return {"avts.arm": self.arm, "avts.pretrain_seed": str(self.seed)}


def study_tags(study: StudyConfig, unit: PretrainUnit, **extra: str) -> dict[str, str]:
    return {"avts.study": study.name, **unit.tags, **extra}


def _tags_override(tags: dict[str, str]) -> str:
    # JSON is YAML flow syntax: the dotted tag names stay keys of one dict.
    return "tracking.tags=" + json.dumps(tags)


# ---------------------------------------------------------------------------------------------
# Records: what produced a run dir's results, so that reuse never takes results of other settings

RECORD = "study_record.json"
# Keys that do not change what a run computes: where it is logged, launched, resumed from.
_UNRECORDED = ("tracking.", "launch.", "run.", "resume", "train.progress")


def pretrain_record(cfg: Config) -> dict[str, Any]:
    """The resolved pretraining config, flattened, without the keys of ``_UNRECORDED``."""
    flat = flatten_config(cfg)
    return {k: v for k, v in flat.items() if not k.startswith(_UNRECORDED)}


def eval_record(job: str, overrides: list[str]) -> dict[str, Any]:
    """An evaluation's job and overrides, without the tracking ones."""
    return {"job": job, "overrides": [o for o in overrides if not o.startswith("tracking.")]}


def write_record(folder: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / RECORD, json.dumps(record, indent=1, sort_keys=True))


def read_record(folder: Path) -> dict[str, Any] | None:
    """The record of ``folder``; None when there is none (results from before records)."""
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def record_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Keys whose values differ; a key only one side knows (a config key added or removed by a
    code change) is not a difference."""
    return sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])


def eval_finished(metrics_file: str | Path, job: str, overrides: list[str]) -> bool:
    """The evaluation's results exist and its record (if any: results from before records have
    none) says they were made with these overrides."""
    metrics_file = Path(metrics_file)
    if not metrics_file.exists():
        return False
    saved = read_record(metrics_file.parent.parent)  # <out_dir>/<job>/metrics.json
    return not saved or not record_differences(saved, eval_record(job, overrides))


def expand(study: StudyConfig) -> list[PretrainUnit]:
    """Arms x seeds, in the YAML's arm order, each with its evaluations (no config resolved)."""
    uri = tracking_uri(study)
    units = []
    for arm, arm_cfg in study.arms.items():
        for seed in study.seeds:
            run_dir = study.runs_dir / f"{arm}_p{seed}"
            unit = PretrainUnit(arm, seed, run_dir, [])
            unit.overrides = [
                *study.overrides,
                *arm_cfg.overrides,
                f"data.url={study.corpus['out']}",
                *[f"{key}={seed}" for key in study.seed_keys],
                f"run.name={study.name}-{arm}-p{seed}",
                f"run.dir={run_dir}",
                f"tracking.uri={uri}",
                f"tracking.experiment={study.name}",
                _tags_override(study_tags(study, unit)),
                "train.progress=false",
            ]
            for name, ev in study.evals.items():
                if arm not in ev.arms:
                    continue
                out_dir = run_dir / "eval" / name
                unit.evals.append(
                    EvalUnit(
                        name,
                        ev.job,
                        [
                            *ev.overrides,
                            *ev.arm_overrides.get(arm, []),
                            f"eval.seed={seed}",
                            f"eval.out_dir={out_dir}",
                            f"tracking.uri={uri}",
                            _tags_override(study_tags(study, unit, **{"avts.study_eval": name})),
                            "eval.progress=false",
                        ],
                        out_dir,
                    )
                )
            units.append(unit)
    return units


def tracking_uri(study: StudyConfig) -> str:
    from avts_dist.tracking.eval_runs import resolve_tracking_uri

    return resolve_tracking_uri(study.tracking_uri)


# ---------------------------------------------------------------------------------------------
# The plan: configs resolved, reuse decided


def _has_checkpoint(cfg: Config) -> bool:
    from avts_dist.train.checkpoint import list_checkpoints

    return bool(list_checkpoints(cfg.checkpoint.dir))


def finished_checkpoint_step(cfg: Config) -> int | None:
    """The step of the newest verified COMPLETE checkpoint of the run, if any."""
    from avts_dist.train.checkpoint import CheckpointError, list_checkpoints, validate

    found = list_checkpoints(cfg.checkpoint.dir)
    if not found:
        return None
    try:
        validate(Path(found[-1].url), found[-1].meta)
    except CheckpointError:
        return None
    return found[-1].step


def _check_eval_overrides(study: StudyConfig) -> None:
    from eval.registry import JOBS

    for name, ev in study.evals.items():
        if not ev.arms:
            continue
        if ev.job not in JOBS:
            _fail(f"evals.{name}.job", f"unknown evaluation {ev.job!r}; known: {', '.join(JOBS)}")
        for arm in ev.arms:
            try:
                load_config(study.pretrain_config, [*ev.overrides, *ev.arm_overrides.get(arm, [])])
            except ConfigError as exc:
                raise ConfigError(f"evals.{name}: {exc}") from None


@dataclass
class StudyPlan:
    study: StudyConfig
    units: list[PretrainUnit]
    cluster: str
    corpus_exists: bool

    @property
    def to_pretrain(self) -> list[PretrainUnit]:
        return [u for u in self.units if not u.reused]

    def evals_after(self, pretrained: bool) -> list[PretrainUnit]:
        """Units with evaluations left, whose pretraining runs now (True) or is reused."""
        return [
            u for u in self.units if u.reused != pretrained and any(not e.reused for e in u.evals)
        ]


def plan(study: StudyConfig, cluster: str) -> StudyPlan:
    """Every unit's config resolved (ConfigError naming the arm and key), reuse decided."""
    from avts_dist.data import DatasetError, DatasetIndex

    _check_eval_overrides(study)
    units = expand(study)
    for unit in units:
        launch = [
            f"launch.cluster={'slurm' if cluster == 'local' else 'debug'}",
            "launch.nodes=1",
            "launch.tasks_per_node=1",
            "launch.gpus_per_node=0",
            f"launch.time={study.launch.time}",
            f"launch.cpus_per_task={study.launch.cpus_per_task}",
            f"launch.folder={study.runs_dir / 'slurm'}",
            f'launch.setup=["export OMP_NUM_THREADS={study.launch.cpus_per_task}"]',
        ]
        try:
            cfg = load_config(study.pretrain_config, [*unit.overrides, *launch])
        except ConfigError as exc:
            raise ConfigError(f"arms.{unit.arm}: {exc}") from None
        cfg.resume = "auto"  # an interrupted pretraining continues from its last checkpoint
        unit.config = cfg
        saved = read_record(unit.run_dir)
        changed = record_differences(saved, pretrain_record(cfg)) if saved else []
        # Only checkpoints made with other settings are a danger (resumed or reused as this
        # config's); a run that failed before its first checkpoint simply runs with the new ones.
        if changed and _has_checkpoint(cfg):
            raise ConfigError(
                f"arms.{unit.arm}: {unit.run_dir} holds this study's pretraining p={unit.seed} "
                f"made with other settings ({', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''}): its checkpoints would be resumed or "
                "reused as if they were this config's. Move that run dir away or give the study "
                "another runs dir (--runs); nothing was changed"
            )
        unit.reused = finished_checkpoint_step(cfg) == cfg.train.max_steps
        for ev in unit.evals:
            ev.reused = ev.finished
            ev.stale = not ev.reused and ev.metrics_file.exists()
    try:
        DatasetIndex.load(study.corpus["out"])
        corpus_exists = True
    except DatasetError:
        corpus_exists = False
    return StudyPlan(study, units, cluster, corpus_exists)


def synth_argv(study: StudyConfig) -> list[str]:
    """The ``avts synth`` command line of ``corpus``; ConfigError for an unknown option."""
    from avts_dist.cli import synth

    parser = argparse.ArgumentParser(prog="avts synth", add_help=False)
    synth.add_arguments(parser)
    known = {a.dest for a in parser._actions}
    argv = ["synth"]
    for key, value in study.corpus.items():
        if key not in known:
            _fail(f"corpus.{key}", f"not an `avts synth` option; known: {', '.join(sorted(known))}")
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def render_plan(p: StudyPlan) -> str:
    """What would run and what is reused, and the job arrays with their dependencies."""
    s = p.study
    out = [
        f"study {s.name}: {len(s.arms)} arm(s) x {len(s.seeds)} seed(s) = {len(p.units)} "
        f"pretraining(s), {sum(len(u.evals) for u in p.units)} evaluation(s); cluster "
        f"{p.cluster}; MLflow experiment {s.name!r} at {tracking_uri(s)}",
        f"corpus {s.corpus['out']}: "
        + (
            "reused (index exists)"
            if p.corpus_exists
            else "to write: avts " + " ".join(synth_argv(s))
        ),
    ]
    for unit in p.units:
        out.append(f"  pretrain {unit.key:28s} {_reuse(unit.reused):7s} {unit.run_dir}")
        for ev in unit.evals:
            why = " (its results were made with other overrides)" if ev.stale else ""
            out.append(f"    eval {ev.name:20s} ({ev.job}) {_reuse(ev.reused)}{why}")
    arrays = _arrays(p)
    for key, units, dep in arrays:
        element = ", ".join(f"{i}={u.key}" for i, u in enumerate(units))
        after = f" with dependency {dep} on {s.name}-pretrain" if dep else ""
        out.append(f"job array {s.name}-{key}: {len(units)} element(s){after}: {element}")
    if not arrays:
        out.append("nothing to run: every pretraining and evaluation is reused")
    if p.cluster == "local":
        from launch import executors

        for key, units, dep in arrays:
            launch = _launch(units[0].config, s, key)
            params = executors.slurm_parameters(
                launch, f"{s.name}-{key}", dependency=dep and f"{dep}:<{s.name}-pretrain id>"
            )
            params["map_count"] = len(units)
            out += [f"# ---- sbatch script: {key}", executors.render_sbatch(params, launch.folder)]
    return "\n".join(out)


def _reuse(done: bool) -> str:
    return "reused" if done else "to run"


def _arrays(p: StudyPlan) -> list[tuple[str, list[PretrainUnit], str]]:
    """(key, units, dependency kind) of each job array, in submission order."""
    arrays = []
    if p.to_pretrain:
        arrays.append(("pretrain", p.to_pretrain, ""))
    if p.evals_after(pretrained=True):
        # Element i evaluates pretraining element i (SLURM's aftercorr: per element, after it
        # completed); an element with nothing left to evaluate returns at once. A batch of one
        # is a plain job (submitit), which aftercorr does not address: afterok.
        dep = "aftercorr" if len(p.to_pretrain) > 1 else "afterok"
        arrays.append(("eval", p.to_pretrain, dep))
    reused = p.evals_after(pretrained=False)
    if reused:
        arrays.append(("eval-reused", reused, ""))
    return arrays


def _launch(cfg: Config, study: StudyConfig, key: str):
    from launch.plan import eval_launch_config

    launch = copy.deepcopy(cfg.launch)
    if key.startswith("eval"):
        launch = eval_launch_config(launch, study.launch.eval_time)
    return launch


# ---------------------------------------------------------------------------------------------
# Execution


@dataclass
class StudyEvals:
    """One array element: the evaluations of one pretrained net, in order; each skipped when its
    results exist (a re-run), each failure kept while the others go on."""

    unit_key: str
    run_dir: str
    evals: list[tuple[str, str, list[str], str]]  # (name, job, overrides, metrics file)

    def __call__(self) -> dict[str, str]:
        from launch.evaljobs import EvalJob

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


def _pretrain_job(unit: PretrainUnit):
    from launch.pretrain import PretrainJob

    assert unit.config is not None
    return PretrainJob(
        redacted_config_dict(unit.config), max_requeues=unit.config.launch.max_requeues
    )


def write_corpus(p: StudyPlan, echo: Callable[[str], None]) -> None:
    if p.corpus_exists:
        return
    from avts_dist.cli import main as avts_main

    argv = synth_argv(p.study)
    echo("avts " + " ".join(argv))
    if avts_main(argv) != 0:
        raise ConfigError(f"corpus: `avts {' '.join(argv)}` failed")


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
    from avts_dist.config import secrets_in_environment
    from launch import executors
    from launch.jobs import GONE, element_name, wait_for_jobs

    ids: dict[str, str] = {}
    elements: dict[str, list[PretrainUnit]] = {}
    with secrets_in_environment(p.units[0].config):
        for key, units, dep in _arrays(p):
            launch = _launch(units[0].config, p.study, key)
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
                    "COMPLETED"
                    if done
                    else ("NOT RUN (pretraining failed)" if state == "CANCELLED" else "FAILED")
                )
    return states


def summary_lines(states: dict[str, str]) -> tuple[list[str], list[str]]:
    """The per-unit lines and the failures among them."""
    lines = [f"  {key:40s} {state}" for key, state in states.items()]
    failed = [k for k, s in states.items() if s not in ("reused", "COMPLETED", "SUBMITTED")]
    return lines, failed
