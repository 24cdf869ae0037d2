"""Packages only some commands need, checked where they are needed: a missing one stops the
command at start in one line that names the fix, not with a traceback mid-run.

- mlflow: tracking (``tracking.enabled=true``: ``avts train``, ``avts eval``, ``avts compare``);
  training with ``tracking.enabled=false`` never imports it (nor does DeepSpeed's import:
  see :func:`import_deepspeed`), and in a tracked run only the ranks that
  track import it (rank 0, and each other node's first rank for its system metrics); the other
  ranks and the ``--nproc`` launcher only check that it is installed.
- submitit: ``avts launch`` and ``avts study --cluster``.
- chromium: no command; only the tests that render the HTML report use it (they skip, with the
  reason, without it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = ["MissingPackageError", "import_deepspeed", "installed", "require", "require_tracking"]


class MissingPackageError(ImportError):
    """A package this command needs does not import: printed as one line, exit status 2."""


def installed(package: str) -> bool:
    """Whether ``package`` is there to import, without importing it (``importlib.util.find_spec``;
    a ``None`` entry in ``sys.modules``, Python's "not importable" marker, counts as absent)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def require(package: str, *, needed_by: str, fix: str, load: bool = True) -> None:
    """Imports ``package`` or raises :class:`MissingPackageError` naming who needs it and the fix.

    ``load=False`` only checks that it is installed (:func:`installed`): for a process that
    never uses it but must stop when it is missing, as a launcher of ranks or a rank that does not
    track does; the package's own import errors then surface in the process that imports it.
    """
    try:
        if load:
            importlib.import_module(package)
        elif not installed(package):
            raise ModuleNotFoundError(f"No module named {package!r}")
    except ImportError as exc:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MissingPackageError(
            f"{needed_by} needs the {package} package, which does not import here ({cause}); {fix}"
        ) from None


def require_tracking(cfg, *, load: bool = True) -> None:
    """A run with ``tracking.enabled=true`` needs mlflow (``load``: see :func:`require`)."""
    if cfg.tracking.enabled:
        require(
            "mlflow",
            needed_by="tracking.enabled=true",
            fix="pip install mlflow, or set tracking.enabled=false",
            load=load,
        )


def import_deepspeed():
    """``deepspeed``, imported once per process without the mlflow it does not need.

    DeepSpeed's package import reaches ``deepspeed.autotuning.autotuner``, which tries ``import
    mlflow`` for its own experiment logging: about 1.7 CPU-seconds and pandas, in every rank,
    also in runs with ``tracking.enabled=false`` and in the ranks that never track. The
    autotuner (``deepspeed --autotuning``, a launcher of its own) is never used here, so while
    DeepSpeed imports, a process that has not imported mlflow itself shows it as absent (Python's
    ``sys.modules[name] = None`` marker); the marker is removed right after, and a later ``import
    mlflow`` (the tracking of rank 0) works as usual. A process that already imported mlflow
    keeps it and DeepSpeed sees it.
    """
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        deepspeed = importlib.import_module("deepspeed")
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:  # still our marker
            del sys.modules["mlflow"]
    return deepspeed
