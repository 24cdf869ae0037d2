"""avts sync-tracking: send a run's undelivered MLflow records (its outbox) to the server.

  avts sync-tracking runs/quickstart
  avts sync-tracking runs/quickstart --tracking-uri http://mlflow:5000

A trainer that could not reach MLflow keeps every record in <run dir>/tracking/outbox.jsonl
(and other nodes' system metrics in <run dir>/tracking/node*/); this sends what the server has
not acknowledged, in order, each record once: a metric the server already holds at that step
is not sent again, so running it twice, or after the trainer delivered part of it, is safe.
The tracking URI is the run's (config.yaml) unless given. Exit status 0 when everything is
delivered, 2 when the server cannot be reached or another process is delivering the outbox.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from avts_dist.cli import CLIError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", help="the run directory (run.dir)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the run's)")


def _outboxes(run_dir: Path) -> list[Path]:
    """The run's outbox, other nodes' outboxes, and outboxes a fresh start moved aside."""
    folders = [run_dir / "tracking", *sorted(run_dir.glob("tracking.*"))]
    found = []
    for folder in folders:
        if (folder / "outbox.jsonl").exists():
            found.append(folder)
        found += sorted(p.parent for p in folder.glob("*/outbox.jsonl"))
    return found


def run(args: argparse.Namespace) -> int:
    # Deferred: MLflow loads only when syncing, not for `avts --help`.
    from avts_dist.config import ConfigError, load_config
    from avts_dist.tracking.mlflow_run import tracking_uri_for
    from avts_dist.tracking.outbox import Outbox, OutboxLocked
    from avts_dist.tracking.writer import TrackingWriter, configure_http, is_permanent_error

    run_dir = Path(args.run_dir)
    folders = _outboxes(run_dir)
    if not folders:
        raise CLIError(f"{run_dir} has no tracking outbox (tracking/outbox.jsonl)")
    uri = args.tracking_uri
    timeout_s, retries = 10, 1
    if (run_dir / "config.yaml").exists():
        try:
            cfg = load_config(run_dir / "config.yaml")
        except ConfigError as exc:
            if uri is None:
                raise CLIError(f"{run_dir}/config.yaml: {exc}; pass --tracking-uri") from None
        else:
            uri = cfg.tracking.uri if uri is None else uri
            timeout_s, retries = cfg.tracking.request_timeout_s, cfg.tracking.request_max_retries
    if uri is None:
        raise CLIError(f"{run_dir} has no config.yaml: pass --tracking-uri")
    configure_http(timeout_s, retries)
    uri = tracking_uri_for(uri)
    id_file = run_dir / "mlflow_run_id"
    for folder in folders:
        outbox = Outbox(folder)
        pending = outbox.num_pending
        if not pending:
            print(f"{folder}: nothing to send (run {outbox.state.run_id or '-'})")
            continue
        main = folder == run_dir / "tracking"
        try:
            writer = TrackingWriter(
                outbox, uri, background=False,
                on_run_id=(lambda rid: id_file.write_text(rid + "\n")) if main else None,
            )  # fmt: skip
        except OutboxLocked as exc:
            raise CLIError(str(exc)) from None
        try:
            num = writer.deliver_all()
        except Exception as exc:  # the server down or refusing: one line, nothing lost
            kind = "refused" if is_permanent_error(exc) else "not reachable"
            line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
            raise CLIError(
                f"MLflow {uri} {kind} ({line}); {outbox.num_pending} of {pending} records of "
                f"{folder} still to send"
            ) from None
        finally:
            writer.close(0)
        c = writer.counters
        print(
            f"{folder}: delivered {num} records to MLflow run {outbox.state.run_id} at {uri} "
            f"({c.num_metrics_sent} metric values sent, {c.num_metrics_already_there} were "
            "there already)"
        )
    return 0
