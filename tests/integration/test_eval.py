"""Every evaluation job end to end at toy size through the real CLI (`avts eval ...`), on the
synthetic corpus and on datasets converted from the real layouts, logging to a real local MLflow
store as child runs of a pretraining run. The checkpoint is a random-init tiny export: these tests
check the plumbing and the metrics' bookkeeping, not accuracy."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from avts_dist.cli import main

TINY = [
    "model.video_width=8",
    "model.video_layers=[1,1,1,1]",
    "model.audio_arch=tiny",
    "model.audio_width=8",
    "model.embed_dim=32",
]
FAST = [
    "eval.finetune.epochs=1",
    "eval.batch_size=4",
    "eval.progress=false",
    "eval.finetune.clips_per_video=2",
    "eval.probe.windows=2",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """A run dir with a real MLflow parent run and a random-init tiny export below it."""
    from mlflow import MlflowClient

    import avts_dist.tracking.eval_runs  # noqa: F401  (allows MLflow's local file store)
    from avts_dist.config import load_config
    from avts_dist.models import build_model, export_payload, save_exported

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pretrain")
    uri = (root / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("avts")
    parent = client.create_run(exp, tags={"mlflow.runName": "pretrain"}).info.run_id
    run_dir = root / "runs" / "tiny"
    (run_dir / "checkpoints" / "step_4").mkdir(parents=True)
    (run_dir / "mlflow_run_id").write_text(parent + "\n")
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = root / "model.pt"
    save_exported(
        export_payload(model, cfg.model, str(run_dir / "checkpoints" / "step_4"), 4), str(path)
    )
    return {
        "path": str(path),
        "parent": parent,
        "uri": uri,
        "client": client,
        "run_dir": run_dir,
        "cfg": cfg,
    }


def _eval(pretrained, job: str, *overrides: str) -> tuple[int, dict | str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(
            [
                "eval",
                job,
                "--checkpoint",
                pretrained["path"],
                "--tracking-uri",
                pretrained["uri"],
                "--json",
                *FAST,
                *overrides,
            ]
        )
    if rc != 0:
        return rc, err.getvalue()
    return rc, json.loads(out.getvalue())


def _child(pretrained, result: dict):
    run = pretrained["client"].get_run(result["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == pretrained["parent"]
    assert run.info.status == "FINISHED"
    return run


def _artifacts(pretrained, run_id: str, path: str = "") -> set[str]:
    out = set()
    for item in pretrained["client"].list_artifacts(run_id, path):
        out |= _artifacts(pretrained, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_sync(pretrained, synth_corpus):
    rc, res = _eval(
        pretrained,
        "sync",
        f"data.url={synth_corpus}",
        "eval.sync.split=train",
        "eval.sync.max_clips=6",
        "eval.sync.offsets=[0.25,0.5,1.0]",
    )
    assert rc == 0, res
    m = res["metrics"]
    assert m["num_clips"] == 6
    for kind in ("easy", "hard", "superhard", "offset_0.25s", "offset_1s"):
        assert 0.0 <= m[f"acc_{kind}"] <= 1.0 and 0.0 <= m[f"pair_acc_{kind}"] <= 1.0
    assert m["acc"] == m["acc_easy"]
    run = _child(pretrained, res)
    assert run.data.params["eval.sync.max_clips"] == "6"
    history = pretrained["client"].get_metric_history(res["run_id"], "sync/acc_vs_offset")
    assert sorted(h.step for h in history) == [250, 500, 1000]
    assert {"sync_vs_offset.png", "sync_vs_offset.csv", "sync_per_kind.csv", "metrics.json"} <= (
        _artifacts(pretrained, res["run_id"])
    )
    # Artifacts land next to the checkpoint's run by default.
    assert Path(res["out_dir"]) == pretrained["run_dir"] / "eval" / "sync"


def test_synthetic_video_finetune_and_audio_probe(pretrained, synth_corpus):
    rc, res = _eval(
        pretrained,
        "synthetic",
        f"data.url={synth_corpus}",
        "eval.probe.classifier=logreg",
        "eval.max_train_videos=6",
    )
    assert rc == 0, res
    m = res["metrics"]
    for key in (
        "video/acc_video",
        "video/acc_clip",
        "video/scratch/acc_video_mean",
        "video/gain_over_scratch",
        "audio/acc",
    ):
        assert key in m
    assert 0 <= m["video/acc_video"] <= 1 and 0 <= m["audio/acc"] <= 1
    arts = _artifacts(pretrained, _child(pretrained, res).info.run_id)
    assert {
        "video/pretrained_main_confusion.png",
        "video/scratch_main_per_class.csv",
        "audio/folds_confusion.png",
    } <= arts


def test_ucf101_three_splits_and_hmdb51(pretrained, prepared_datasets):
    url = prepared_datasets["ucf101"]["url"]
    rc, res = _eval(pretrained, "ucf101", f"eval.datasets.ucf101={url}")
    assert rc == 0, res
    m = res["metrics"]
    for variant in ("pretrained", "scratch"):
        per_split = [m[f"{variant}/split{k}/acc_video"] for k in (1, 2, 3)]
        assert m[f"{variant}/acc_video_mean"] == pytest.approx(sum(per_split) / 3)
        assert all(0 <= a <= 1 for a in per_split)
    assert m["gain_over_scratch"] == pytest.approx(m["acc_video"] - m["scratch/acc_video_mean"])
    with open(Path(res["out_dir"]) / "pretrained_split2_per_class.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == "class,support,correct,accuracy" and len(lines) == 4
    # split k tests group k: 3 classes x 2 clips per group
    assert sum(int(line.split(",")[1]) for line in lines[1:]) == 6

    url = prepared_datasets["hmdb51"]["url"]
    rc, res = _eval(
        pretrained,
        "hmdb51",
        f"eval.datasets.hmdb51={url}",
        "eval.splits=[2]",
        "eval.finetune.scratch_baseline=false",
    )
    assert rc == 0, res
    assert "pretrained/split2/acc_video" in res["metrics"]
    assert "scratch/acc_video_mean" not in res["metrics"]


def test_esc50_and_dcase_linear_probe_over_folds(pretrained, prepared_datasets):
    rc, res = _eval(
        pretrained,
        "esc50",
        f"eval.datasets.esc50={prepared_datasets['esc50']['url']}",
        "eval.probe.feature_layer=layer2",
    )
    assert rc == 0, res
    m = res["metrics"]
    assert m["num_folds"] == 5 and m["feature_dim"] == 16  # tiny audio net: layer2 = 2 x width
    assert m["acc"] == pytest.approx(sum(m[f"fold{k}/acc"] for k in range(1, 6)) / 5)
    rc, res = _eval(
        pretrained,
        "dcase2014",
        f"eval.datasets.dcase2014={prepared_datasets['dcase2014']['url']}",
        "eval.probe.classifier=logreg",
    )
    assert rc == 0, res
    assert res["metrics"]["num_folds"] == 2
    assert _child(pretrained, res).data.params["eval.probe.classifier"] == "logreg"


def test_multimodal_counts_clips_without_audio(pretrained, prepared_datasets, layout_sources):
    url = prepared_datasets["ucf101"]["url"]
    rc, res = _eval(pretrained, "multimodal", f"eval.datasets.multimodal={url}", "eval.splits=[1]")
    assert rc == 0, res
    m = res["metrics"]
    # split 1 tests group 1: 6 clips, every other one silent
    assert m["num_test_without_audio"] == 3
    assert 0 <= m["acc"] <= 1 and 0 <= m["acc_audio_only"] <= 1


def test_clear_errors(pretrained, prepared_datasets, tmp_path):
    rc, err = _eval(
        pretrained,
        "ucf101",
        "model.video_width=16",
        f"eval.datasets.ucf101={prepared_datasets['ucf101']['url']}",
    )
    assert rc == 2 and "does not match the config" in err and "video_width=16" in err
    rc, err = _eval(pretrained, "ucf101")
    assert rc == 2 and "eval.datasets.ucf101" in err
    rc, err = _eval(pretrained, "esc50", f"eval.datasets.esc50={tmp_path / 'nothing'}")
    assert rc == 2 and "dataset for esc50" in err
    # Weights that do not fit the export's own model_config.
    payload = torch.load(pretrained["path"], weights_only=True)
    payload["model_config"] = dataclasses.asdict(
        dataclasses.replace(pretrained["cfg"].model, video_width=16)
    )
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    out, errbuf = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errbuf):
        rc = main(
            [
                "eval",
                "ucf101",
                "--checkpoint",
                str(bad),
                "--tracking-uri",
                pretrained["uri"],
                *FAST,
                f"eval.datasets.ucf101={prepared_datasets['ucf101']['url']}",
            ]
        )
    assert rc == 2 and "does not match the model config" in errbuf.getvalue()
    assert "Traceback" not in errbuf.getvalue()


def test_sync_on_a_real_training_checkpoint_dir(synth_corpus, tmp_path):
    """Real chain: `avts train` (subprocess, 4 steps) -> checkpoint dir -> `avts eval sync`,
    exported on the fly, nested under the training run's MLflow run."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    uri = (tmp_path / "mlruns").as_uri()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "avts_dist",
            "train",
            "--config",
            "configs/pretrain/quickstart.yaml",
            f"data.url={synth_corpus}",
            f"run.dir={run_dir}",
            f"tracking.uri={uri}",
            "train.max_steps=4",
            "train.val_every_steps=0",
            "data.global_batch_size=4",
            "tracking.system_metrics=false",
            "train.progress=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert train.returncode == 0, train.stderr[-2000:]
    parent = (run_dir / "mlflow_run_id").read_text().strip()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(
            [
                "eval",
                "sync",
                "--checkpoint",
                str(run_dir / "checkpoints"),
                "--json",
                "eval.sync.split=train",
                "eval.sync.max_clips=4",
                "eval.progress=false",
            ]
        )
    assert rc == 0
    res = json.loads(out.getvalue())  # stdout is the JSON alone (export talks on stderr)
    assert res["parent_run_id"] == parent and res["metrics"]["num_clips"] == 4
    child = MlflowClient(tracking_uri=uri).get_run(res["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert Path(res["out_dir"]) == run_dir / "eval" / "sync"
