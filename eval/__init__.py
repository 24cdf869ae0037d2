"""Evaluation jobs: each runs alone (``avts eval <job> --checkpoint X [k=v ...]``) and logs to
MLflow as a child run of the pretraining run it evaluates. The list is :data:`JOBS`
(eval/registry.py); reading the results back (``avts compare``) is the :mod:`report` package.

=============  ==============================================  ================================
job            what                                            dataset (``eval.datasets.<job>``)
=============  ==============================================  ================================
sync           held-out sync accuracy (easy/hard/superhard,    default: ``data.url``, split
               accuracy vs offset)                              ``eval.sync.split``/``data.val_split``
ucf101         fine-tune video net (+ scratch), 3 splits       ``avts prepare ucf101`` output
hmdb51         same                                             ``avts prepare hmdb51`` output
esc50          frozen audio features + linear classifier,      ``avts prepare esc50`` output
               5 folds
dcase2014      same, official folds                            ``avts prepare dcase2014`` output
multimodal     video fine-tune + audio logreg, late fusion     any labelled video dataset
synthetic      the synthetic corpus's labels: video fine-tune  default: ``data.url``
               (+ scratch) and audio linear probe
lowlabel       k labelled clips per class (``eval_train`` ->   default: ``data.url``
               ``eval_test``): fine-tune and linear probe,
               k x fine-tuning seeds (+ scratch, multimodal)
=============  ==============================================  ================================

Modules: :mod:`eval.registry` (the job list), :mod:`eval.run` (``evaluate``: one job, tracked),
:mod:`eval.pretrained` (checkpoint -> weights), :mod:`eval.splits` (split plans),
:mod:`eval.common` (clips, features, classifiers, artifacts), one module per runner
(:mod:`eval.sync`, :mod:`eval.action`, :mod:`eval.audio`, :mod:`eval.multimodal`,
:mod:`eval.lowlabel`). This package file stays light (see eval/registry.py).
"""

from eval.registry import JOBS, EvalError, EvalSpec, get_job

__all__ = ["JOBS", "EvalError", "EvalSpec", "get_job"]
