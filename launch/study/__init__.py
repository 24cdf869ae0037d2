"""``avts study``: the protocol of docs/results.md as one command.

A study YAML (``configs/study/*.yaml``, schema :class:`StudyConfig`, :mod:`.schema`) names the
corpus (the ``avts synth`` options, written once through ``synthesize``), the base pretraining
config, the arms (name -> config overrides), the pretraining seeds and the evaluations of each
pretrained net. :func:`expand` turns it into units of work (arms x seeds pretrainings, each with
its evaluations); :func:`plan` resolves every unit's config (bad keys fail here, before anything
runs) and marks what a previous invocation already finished (reuse, :mod:`.records`);
:func:`execute` (:mod:`.execute`) runs what is left through the launch layer:

- ``--cluster local``: the local SLURM cluster, as two job arrays: the pretrainings, and one
  evaluation element per pretraining with ``aftercorr`` on it (element i starts when
  pretraining i completed; a failed pretraining's element is cancelled, the others go on).
  Evaluations of reused pretrainings form a third array with no dependency.
- ``--cluster debug``: everything in this process, serially (the job callables called here).

Every run carries ``tracking.tags`` ``avts.study``, ``avts.arm``, ``avts.pretrain_seed`` (and
``avts.study_eval`` on evaluations), all in one MLflow experiment named after the study, which is
what ``avts compare --study NAME`` searches.
"""

from launch.study.execute import execute, jobs_in_slurm, summary_lines
from launch.study.plan import (
    EvalUnit,
    PretrainUnit,
    StudyPlan,
    expand,
    plan,
    render_plan,
    synth_argv,
    tracking_uri,
)
from launch.study.schema import ArmConfig, CorpusConfig, StudyConfig, StudyEvalConfig, load_study

__all__ = [
    "ArmConfig",
    "CorpusConfig",
    "EvalUnit",
    "PretrainUnit",
    "StudyConfig",
    "StudyEvalConfig",
    "StudyPlan",
    "execute",
    "expand",
    "jobs_in_slurm",
    "load_study",
    "plan",
    "render_plan",
    "summary_lines",
    "synth_argv",
    "tracking_uri",
]
