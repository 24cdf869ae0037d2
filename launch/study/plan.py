"""The study's units of work and its plan: arms x seeds expanded (:func:`expand`), every config
resolved and reuse decided (:func:`plan`), and what would run rendered (:func:`render_plan`)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from avts_dist.config import Config, ConfigError, LaunchConfig, load_config
from avts_dist.data import DatasetError, DatasetIndex
from avts_dist.tracking.eval_runs import resolve_tracking_uri
from avts_dist.train.checkpoint import CheckpointError, list_checkpoints, validate
from eval.registry import JOBS
from launch import executors
from launch.plan import eval_launch_config
from launch.study.records import eval_finished, pretrain_record, read_record, record_differences
from launch.study.schema import StudyConfig

__all__ = [
    "EvalUnit",
    "PretrainUnit",
    "StudyPlan",
    "array_launch",
    "expand",
    "finished_checkpoint_step",
    "job_arrays",
    "plan",
    "render_plan",
    "study_tags",
    "synth_argv",
    "tracking_uri",
]


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
    return resolve_tracking_uri(study.tracking_uri)


def _has_checkpoint(cfg: Config) -> bool:
    return bool(list_checkpoints(cfg.checkpoint.dir))


def finished_checkpoint_step(cfg: Config) -> int | None:
    """The step of the newest verified COMPLETE checkpoint of the run, if any."""
    found = list_checkpoints(cfg.checkpoint.dir)
    if not found:
        return None
    try:
        validate(Path(found[-1].url), found[-1].meta)
    except CheckpointError:
        return None
    return found[-1].step


def _check_eval_overrides(study: StudyConfig) -> None:
    for name, ev in study.evals.items():
        if not ev.arms:
            continue
        if ev.job not in JOBS:
            raise ConfigError(
                f"config key 'evals.{name}.job': unknown evaluation {ev.job!r}; known: "
                f"{', '.join(JOBS)}"
            )
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
    """The ``avts synth`` command line that writes the same corpus (``corpus`` as written; the
    study itself calls :func:`avts_dist.data.synthetic.synthesize`)."""
    argv = ["synth"]
    for key, value in study.corpus.items():
        text = json.dumps(value) if isinstance(value, dict) else str(value)
        argv += [f"--{key.replace('_', '-')}", text]
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
    arrays = job_arrays(p)
    for key, units, dep in arrays:
        element = ", ".join(f"{i}={u.key}" for i, u in enumerate(units))
        after = f" with dependency {dep} on {s.name}-pretrain" if dep else ""
        out.append(f"job array {s.name}-{key}: {len(units)} element(s){after}: {element}")
    if not arrays:
        out.append("nothing to run: every pretraining and evaluation is reused")
    if p.cluster == "local":
        for key, units, dep in arrays:
            launch = array_launch(units[0].config, s, key)
            params = executors.slurm_parameters(
                launch, f"{s.name}-{key}", dependency=dep and f"{dep}:<{s.name}-pretrain id>"
            )
            params["map_count"] = len(units)
            out += [f"# ---- sbatch script: {key}", executors.render_sbatch(params, launch.folder)]
    return "\n".join(out)


def _reuse(done: bool) -> str:
    return "reused" if done else "to run"


def job_arrays(p: StudyPlan) -> list[tuple[str, list[PretrainUnit], str]]:
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


def array_launch(cfg: Config, study: StudyConfig, key: str) -> LaunchConfig:
    launch = copy.deepcopy(cfg.launch)
    if key.startswith("eval"):
        launch = eval_launch_config(launch, study.launch.eval_time)
    return launch
