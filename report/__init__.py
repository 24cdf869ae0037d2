"""Reporting: what is read back from MLflow and shown, apart from the evaluation jobs (eval/).

- :mod:`report.fetch`: every MLflow read of the reports (runs, metric histories, a study's runs).
- :mod:`report.compare`: ``avts compare``: runs side by side (pretraining rows, evaluation columns).
- :mod:`report.html`, :mod:`report.groups`, :mod:`report.figures`, :mod:`report.plots`: the
  report ``--out`` writes (``compare.html``, CSVs, PNG figures), rendered from what was fetched.
- :mod:`report.study_tables`: ``avts compare --study``: a study's tables T1-T5.
- :mod:`report.best`: ``avts compare --best``: checkpoints ranked by a metric.
- :mod:`report.headline`: the few figures ``avts eval`` prints.
- :mod:`report.metric_docs`: what each metric means and which direction is better.

Intervals come from :mod:`avts_dist.stats`.
"""
