"""`avts compare` over real MLflow runs in a local store: two pretraining runs (curriculum on and
off) with loss curves, each with child evaluation runs created by the eval tracking helper."""

from __future__ import annotations

import csv

import pytest

import avts_dist.tracking.eval_runs  # noqa: F401  (allows MLflow's local file store)
from avts_dist.cli import main
from avts_dist.tracking.eval_runs import EvalRun


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = (tmp_path_factory.mktemp("cmp") / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ablation")
    parents = {}
    for name, curriculum, final_acc in (
        ("curriculum", "true", 0.8),
        ("no_curriculum", "false", 0.6),
    ):
        rid = client.create_run(exp, tags={"mlflow.runName": name}).info.run_id
        client.log_batch(
            rid,
            params=[
                Param("curriculum.enabled", curriculum),
                Param("data.fps", "8.0"),
                Param("run.dir", f"runs/{name}"),
            ],
        )
        client.log_batch(rid, metrics=[Metric("loss", 1.0 / (s + 1), 0, s) for s in range(5)])
        client.set_terminated(rid)
        parents[name] = rid
        sync = EvalRun("sync", tracking_uri=uri, parent_run_id=rid)
        sync.log_metrics(
            {"sync/acc": final_acc, "sync/acc_hard": final_acc - 0.1, "sync/num_clips": 8}
        )
        for ms in (250, 500, 1000):
            sync.log_metrics({"sync/acc_vs_offset": final_acc * ms / 1000}, step=ms)
        sync.end()
        ucf = EvalRun("ucf101", tracking_uri=uri, parent_run_id=rid)
        ucf.log_metrics(
            {
                "ucf101/acc_video": final_acc - 0.2,
                "ucf101/scratch/acc_video_mean": 0.3,
                "ucf101/pretrained/split1/acc_video": 0.5,
            }
        )
        ucf.end()
    orphan = EvalRun("esc50", tracking_uri=uri, experiment="ablation")
    orphan.log_metrics({"esc50/acc": 0.7})
    orphan.end()
    return {"uri": uri, "parents": parents, "client": client}


def test_compare_groups_children_and_writes_outputs(store, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(
        ["compare", "--experiment", "ablation", "--tracking-uri", store["uri"], "--out", str(out)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0].split()
    assert header[:2] == ["curriculum", "no_curriculum"] and "eval-esc50" in header
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:] if line.strip()}
    # Only the parameter that differs is shown; run.dir is ignored.
    assert lines["curriculum.enabled"][:2] == ["true", "false"]
    assert "data.fps" not in lines and "run.dir" not in lines
    assert lines["num_evals"][:2] == ["2", "2"]
    assert lines["sync/acc"][:2] == ["0.8000", "0.6000"]
    assert lines["ucf101/scratch/acc_video_mean"][:2] == ["0.3000", "0.3000"]
    # Headline only by default: per-split details and counters stay out.
    assert "ucf101/pretrained/split1/acc_video" not in lines and "sync/num_clips" not in lines
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    by_run = {r["run"]: r for r in rows}
    assert by_run["curriculum"]["run_id_full"] == store["parents"]["curriculum"]
    assert float(by_run["no_curriculum"]["ucf101/acc_video"]) == pytest.approx(0.4)
    html = (out / "compare.html").read_text()
    assert "no_curriculum" in html and "downstream.png" in html
    for png in ("training_curves.png", "sync_vs_offset.png", "downstream.png"):
        data = (out / png).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000


def test_compare_selected_runs_and_metric_patterns(store, capsys):
    rid = store["parents"]["curriculum"]
    rc = main(["compare", "--runs", rid, "--tracking-uri", store["uri"], "--metrics", "ucf101/*"])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["curriculum"]
    names = {line.split()[0] for line in text.splitlines()[2:]}
    assert {"ucf101/acc_video", "ucf101/pretrained/split1/acc_video"} <= names
    assert "sync/acc" not in names


def test_compare_errors(store, capsys):
    assert main(["compare", "--experiment", "nope", "--tracking-uri", store["uri"]]) == 2
    assert "experiment 'nope' not found" in capsys.readouterr().err
    assert main(["compare", "--runs", "0" * 32, "--tracking-uri", store["uri"]]) == 2
    assert "not found" in capsys.readouterr().err


def test_compare_and_eval_runs_on_a_tracking_server(mlflow_server, capsys):
    """The same path against a real `mlflow server` over HTTP (session fixture)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment("cmp-server")
    parent = client.create_run(exp, tags={"mlflow.runName": "pretrain-srv"}).info.run_id
    child = EvalRun("esc50", tracking_uri=mlflow_server, parent_run_id=parent)
    child.log_metrics({"esc50/acc": 0.75})
    child.end()
    assert client.get_run(child.run_id).info.experiment_id == exp
    assert main(["compare", "--experiment", "cmp-server", "--tracking-uri", mlflow_server]) == 0
    lines = capsys.readouterr().out.splitlines()
    # MLflow itself prints "View run at ..." lines for server runs: the table starts above "---".
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) - 1
    lines = lines[start:]
    assert lines[0].split() == ["pretrain-srv"]
    assert any(line.split()[:2] == ["esc50/acc", "0.7500"] for line in lines)
