"""`avts compare` over real MLflow runs in a local store: two pretraining runs (curriculum on and
off) with loss curves, each with child evaluation runs created by the eval tracking helper; and
the report (`--out`) over a seeded ablation (tests/fixtures/mlflow_runs.py): configurations,
intervals, legend, figures beside their tables, links to the MLflow UI of a tracking server.
(The report in a real browser: test_report_browser.py.)"""

from __future__ import annotations

import csv
import json
import math
import re
import urllib.request

import numpy as np
import pytest

import avts_dist.tracking.eval_runs  # noqa: F401  (allows MLflow's local file store)
from avts_dist.cli import main
from avts_dist.tracking.eval_runs import EvalRun
from tests.fixtures.mlflow_runs import log_seeded_comparison

# Student's t quantile for a 95% interval with 2 degrees of freedom (3 seeds), from tables.
T_975_DF2 = 4.3027


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
    html = (out / "compare.html").read_text().replace("<wbr>", "")
    assert "no_curriculum" in html and html.count('src="data:image/png;base64,') == 3
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


@pytest.fixture(scope="module")
def seeded(seeded_report) -> dict:
    return {**seeded_report, "html": seeded_report["page"].read_text()}


def _sections(page: str) -> dict[str, str]:
    """HTML after each <h2> heading, up to the next one."""
    parts = re.split(r"<h2>(.*?)</h2>", page)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_report_groups_seeds_into_configurations_with_intervals(seeded):
    values = seeded["comparison"].values
    with (seeded["out"] / "compare_groups.csv").open() as f:
        rows = {(r["configuration"], r["metric"]): r for r in csv.DictReader(f)}
    # Configurations are named after their runs (curriculum-s0, -s1, -s2 -> curriculum).
    assert {k[0] for k in rows} == set(values)
    for arm, metrics in values.items():
        for metric in ("sync/acc", "sync/acc_hard", "synthetic/video/acc_video", "loss"):
            xs = np.array(metrics[metric])
            row = rows[(arm, metric)]
            assert int(row["n"]) == 3
            assert float(row["mean"]) == pytest.approx(xs.mean(), rel=1e-5)
            half = T_975_DF2 * xs.std(ddof=1) / math.sqrt(3)
            assert float(row["ci95_half_width"]) == pytest.approx(half, rel=1e-4)
        assert rows[(arm, "loss")]["better"] == "lower"
        assert rows[(arm, "sync/acc")]["better"] == "higher"
    # Cells show mean +- half width and n; the best configuration per row is bold.
    page = seeded["html"].replace("<wbr>", "")
    xs = np.array(values["curriculum"]["sync/acc"])
    half = T_975_DF2 * xs.std(ddof=1) / math.sqrt(3)
    assert (
        f'<span class="v">{xs.mean():.3f}</span> <span class="ci">&plusmn;&nbsp;{half:.3f}' in page
    )
    best = max(values, key=lambda arm: np.mean(values[arm]["sync/acc"]))
    cell = re.search(
        r'<th class="name">sync/acc <span class="dir" title="higher is better">&uarr;</span></th>'
        r"(.*?)</tr>",
        page,
    ).group(1)
    bold = re.findall(r'<td class="num best"><span class="v">([\d.]+)</span>', cell)
    assert bold == [f"{np.mean(values[best]['sync/acc']):.3f}"]


def test_report_legend_and_figures_beside_their_tables(seeded):
    page = seeded["html"].replace("<wbr>", "")
    # Self-contained: no script, no stylesheet link, every image inline.
    assert "<script" not in page and "<link" not in page
    assert re.findall(r'<img [^>]*src="(?!data:image/png;base64,)', page) == []
    sections = _sections(page)
    legend = sections["Reading this report"]
    for metric, better in (
        ("loss", "Lower"),
        ("sync/acc_hard", "Higher"),
        ("val/sync_acc_easy", "Higher"),
    ):
        assert re.search(
            rf"<dt>{re.escape(metric)} <span[^>]*>.*?</dt><dd>[^<]+<i>{better} is better", legend
        ), metric
    assert "data.seed, loss.seed form one configuration" in legend
    for title, alt, metric in (
        ("Pretraining", "training curves", "val/sync_acc_hard"),
        ("Synchronisation", "sync accuracy against audio offset", "sync/acc_superhard"),
        ("Downstream", "downstream accuracy", "synthetic/video/gain_over_scratch"),
    ):
        pair = re.search(r'<div class="pair">(.*)', sections[title], re.S).group(1)
        assert f'alt="{alt}"' in pair and f'<th class="name">{metric} ' in pair, title
    # The configuration table spells out what differs; the runs table lists every run.
    configs = sections["Configurations"]
    assert "curriculum.enabled" in configs and '"superhard"' in configs.replace("&quot;", '"')
    runs = sections["Runs"]
    assert all(f"{arm}-s{seed}" in runs for arm in seeded["comparison"].values for seed in range(3))
    assert "#/experiments/" not in page  # a local store has no UI to link to


def test_report_links_runs_to_the_mlflow_ui(mlflow_server, tmp_path):
    arms = {
        "curriculum": (True, "easy_then_hard", 0.85),
        "no_curriculum": (False, "easy_then_hard", 0.8),
    }
    comparison = log_seeded_comparison(
        mlflow_server, "report-links", arms=arms, seeds=(0, 1), steps=20
    )
    out = tmp_path / "out"
    args = ["compare", "--experiment", "report-links", "--tracking-uri", mlflow_server]
    assert main([*args, "--out", str(out)]) == 0
    links = set(re.findall(r'<a href="([^"]+)">', (out / "compare.html").read_text()))
    expected = {
        f"{mlflow_server}/#/experiments/{comparison.experiment_id}/runs/{rid}"
        for parent in comparison.parents.values()
        for rid in [parent, *comparison.children[parent]]
    }
    assert expected <= links
    # Each linked run is the one MLflow's own API returns for that experiment.
    for link in sorted(expected)[:3]:
        exp_id, run_id = re.search(r"/experiments/(\w+)/runs/(\w+)$", link).groups()
        with urllib.request.urlopen(
            f"{mlflow_server}/api/2.0/mlflow/runs/get?run_id={run_id}"
        ) as r:
            assert json.load(r)["run"]["info"]["experiment_id"] == exp_id
