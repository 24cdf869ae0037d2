"""Packages only some commands need, checked where they are needed: a missing one stops the
command at start in one line that names the fix, not with a traceback mid-run.

- mlflow: tracking (``tracking.enabled=true``: ``avts train``, ``avts eval``, ``avts compare``);
  training with ``tracking.enabled=false`` never imports it.
- submitit: ``avts launch`` and ``avts study --cluster``.
- chromium: no command; only the tests that render the HTML report use it (they skip, with the
  reason, without it).
"""

from __future__ import annotations

import importlib

__all__ = ["MissingPackageError", "require"]


class MissingPackageError(ImportError):
    """A package this command needs does not import: printed as one line, exit status 2."""


def require(package: str, *, needed_by: str, fix: str) -> None:
    """Imports ``package`` or raises :class:`MissingPackageError` naming who needs it and the fix."""
    try:
        importlib.import_module(package)
    except ImportError as exc:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MissingPackageError(
            f"{needed_by} needs the {package} package, which does not import here ({cause}); {fix}"
        ) from None


def require_tracking(cfg) -> None:
    """A run with ``tracking.enabled=true`` needs mlflow."""
    if cfg.tracking.enabled:
        require(
            "mlflow",
            needed_by="tracking.enabled=true",
            fix="pip install mlflow, or set tracking.enabled=false",
        )
