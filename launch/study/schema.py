"""The study YAML (``configs/study/*.yaml``): its typed schema, checked when it is loaded."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avts_dist.config import fail, load_config

__all__ = [
    "ArmConfig",
    "CorpusConfig",
    "StudyConfig",
    "StudyEvalConfig",
    "StudyLaunchConfig",
    "load_study",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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
class CorpusConfig:
    """The options of ``avts synth`` (with its defaults): the keyword arguments of
    :func:`avts_dist.data.synthetic.synthesize`, ``out`` being its ``url``."""

    out: str = ""
    num_videos: int = 64
    seconds: float = 4.0
    fps: float = 8.0
    size: int = 32
    sample_rate: int = 16000
    num_classes: int = 4
    shard_size: int = 16
    seed: int = 0
    broken_fraction: float = 0.0
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    eval_train_fraction: float = 0.15
    eval_test_fraction: float = 0.15
    label_set: str = "rhythm"
    # 1: sound goes with picture; 2: only time ties them (docs/data-format.md)
    version: int = 1
    num_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    name: str = ""
    # `avts synth` options (long names with _ for -), `out` included; written once, reused when
    # its index exists. Kept as written (the plan shows them as the `avts synth` command line);
    # check_corpus() gives them typed (CorpusConfig).
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
        self.check_corpus()
        if not _NAME.fullmatch(self.name or ""):
            fail("name", f"a study name of letters, digits, _ . - is required, got {self.name!r}")
        if not self.arms:
            fail("arms", "at least one arm is required")
        for arm in self.arms:
            if not _NAME.fullmatch(arm) or arm == "scratch":
                fail(f"arms.{arm}", "arm names are letters, digits, _ . - (and not 'scratch')")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            fail("seeds", f"distinct pretraining seeds expected, got {self.seeds}")
        if not self.seed_keys:
            fail("seed_keys", "at least one config key must take the pretraining seed")
        for name, ev in self.evals.items():
            if not _NAME.fullmatch(name):
                fail(f"evals.{name}", "eval names are letters, digits, _ . -")
            if not ev.job:
                fail(f"evals.{name}.job", "an evaluation job name is required")
            for key, arms in (("arms", ev.arms), ("arm_overrides", list(ev.arm_overrides))):
                unknown = sorted(set(arms) - set(self.arms))
                if unknown:
                    fail(
                        f"evals.{name}.{key}", f"unknown arm(s) {unknown}; arms: {list(self.arms)}"
                    )
        if self.launch.cpus_per_task < 1:
            fail("launch.cpus_per_task", "must be >= 1")

    @property
    def runs_dir(self) -> Path:
        return Path(self.runs or f"runs/study_{self.name}").resolve()

    def check_corpus(self) -> CorpusConfig:
        """``corpus`` as the typed options of :func:`synthesize`; ConfigError naming the key."""
        known = [f.name for f in dataclasses.fields(CorpusConfig)]
        for key in self.corpus:
            if key not in known:
                fail(f"corpus.{key}", f"not an `avts synth` option; known: {', '.join(known)}")
        try:
            corpus = OmegaConf.to_object(
                OmegaConf.merge(OmegaConf.structured(CorpusConfig), dict(self.corpus))
            )
        except OmegaConfBaseException as exc:
            fail(f"corpus.{getattr(exc, 'full_key', '')}", str(exc).splitlines()[0])
        if not corpus.out:
            fail("corpus.out", "the corpus URL is required")
        return corpus


def load_study(path: str, overrides: list[str] | None = None) -> StudyConfig:
    """The typed study config; ConfigError naming the key for anything unknown or invalid."""
    return load_config(path, overrides, schema=StudyConfig)
