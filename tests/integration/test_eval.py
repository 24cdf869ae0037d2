"""Every evaluation job end to end at toy size through the real CLI (`avts eval ...`), on the
synthetic corpus and on datasets converted from the real layouts, logging to a real local MLflow
store as child runs of a pretraining run.

The checkpoint is a random-init tiny export, so most accuracies have no known value; what is
known is checked: pair counts fixed by the clip geometry, every figure against its own
definition and artifacts, sync scores of models built to give constant embeddings or logits,
and audio probes on pure tones (class-specific pitch), which even random features separate."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
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
    from avts_dist.export import export_payload, save_exported
    from avts_dist.models import build_model

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


SYNC = ["eval.sync.split=train", "eval.sync.max_clips=6", "eval.sync.offsets=[0.25,0.5,1.0]"]
SYNC_KINDS = ("easy", "hard", "superhard", "offset_0.25s", "offset_0.5s", "offset_1s")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sync(pretrained, synth_corpus):
    rc, res = _eval(pretrained, "sync", f"data.url={synth_corpus}", *SYNC)
    assert rc == 0, res
    m = res["metrics"]
    assert m["num_clips"] == 6 and m["num_skipped"] == 0
    # 4 s clips, 1 s windows: every clip has room for every kind and offset.
    assert {m[f"num_{kind}"] for kind in SYNC_KINDS} == {6}
    assert m["threshold"] == pytest.approx(0.99 / 2)  # loss.margin / 2
    for kind in SYNC_KINDS:
        assert m[f"acc_{kind}"] == pytest.approx(0.5 * (m["tpr"] + m[f"reject_{kind}"]))
        # Six pairs: every rate is a whole number of sixths.
        for name in (f"reject_{kind}", f"pair_acc_{kind}"):
            assert round(m[name] * 6, 4) == int(round(m[name] * 6)), name
    assert m["acc"] == m["acc_easy"]
    run = _child(pretrained, res)
    assert run.data.params["eval.sync.max_clips"] == "6"
    history = pretrained["client"].get_metric_history(res["run_id"], "sync/acc_vs_offset")
    assert {h.step: h.value for h in history} == pytest.approx(
        {250: m["acc_offset_0.25s"], 500: m["acc_offset_0.5s"], 1000: m["acc_offset_1s"]}
    )
    assert {"sync_vs_offset.png", "sync_vs_offset.csv", "sync_per_kind.csv", "metrics.json"} <= (
        _artifacts(pretrained, res["run_id"])
    )
    # Artifacts land next to the checkpoint's run by default, and say what the metrics say.
    out = Path(res["out_dir"])
    assert out == pretrained["run_dir"] / "eval" / "sync"
    per_kind = {r["kind"]: r for r in _csv(out / "sync_per_kind.csv")}
    assert list(per_kind) == ["easy", "hard", "superhard"]
    for kind, r in per_kind.items():
        assert float(r["balanced_acc"]) == pytest.approx(m[f"acc_{kind}"])
        assert float(r["pair_acc"]) == pytest.approx(m[f"pair_acc_{kind}"])
        assert int(r["num_pairs"]) == 6
    assert [float(r["offset_s"]) for r in _csv(out / "sync_vs_offset.csv")] == [0.25, 0.5, 1.0]
    # Offset classification: 21 classes over +-1.0 s, every clip long enough (4 s >= 1 + 2 x 1).
    assert m["num_offset_clips"] == 6 and m["num_offset_classes"] == 21
    assert m["num_offset_left_out"] == 0
    assert round(m["offset_acc"] * 126, 4) == int(round(m["offset_acc"] * 126))
    assert m["offset_acc"] <= m["offset_acc_within1"]
    table = _csv(out / "offset_classes.csv")
    assert [float(r["offset_s"]) for r in table] == pytest.approx([k / 10 for k in range(-10, 11)])
    assert np.mean([float(r["acc"]) for r in table]) == pytest.approx(m["offset_acc"])
    by_offset = pretrained["client"].get_metric_history(res["run_id"], "sync/offset_acc_by_offset")
    assert {h.step: h.value for h in by_offset} == pytest.approx(
        {round(float(r["offset_s"]) * 1000): float(r["acc"]) for r in table}
    )
    assert {"offset_classes.csv", "offset_classes.png"} <= _artifacts(pretrained, res["run_id"])


def _check_per_class(path: Path, acc: float, num_test: int | None = None) -> None:
    """A per-class CSV agrees with the accuracy logged for it: correct / support, clip counts."""
    rows = _csv(path)
    support = sum(int(r["support"]) for r in rows)
    correct = sum(int(r["correct"]) for r in rows)
    assert correct / support == pytest.approx(acc)
    if num_test is not None:
        assert support == num_test
    for r in rows:
        if int(r["support"]):
            assert float(r["accuracy"]) == pytest.approx(
                int(r["correct"]) / int(r["support"]), abs=1e-4
            )


def _constant_export(pretrained, tmp_path, *, fusion_logit: float | None) -> str:
    """An export whose embedding heads output one constant vector (every pair at distance 0),
    or, with a fusion head, whose fusion head outputs ``fusion_logit`` for every pair."""
    from avts_dist.config import load_config
    from avts_dist.export import export_payload, save_exported
    from avts_dist.models import build_model

    overrides = TINY + (["model.fusion_head=true"] if fusion_logit is not None else [])
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for name in ("video", "audio"):
            model.heads[name][2].weight.zero_()
            model.heads[name][2].bias.fill_(0.3)
        if fusion_logit is not None:
            model.heads["fusion"].mlp[2].weight.zero_()
            model.heads["fusion"].mlp[2].bias.fill_(fusion_logit)
    source = str(pretrained["run_dir"] / "checkpoints" / "step_4")
    path = tmp_path / f"constant_{fusion_logit}.pt"
    save_exported(export_payload(model, cfg.model, source, 4), str(path))
    return str(path)


@pytest.mark.parametrize(
    "fusion_logit, tpr, reject",
    [
        # Distance 0 is below the threshold: every pair, positive or not, is called in sync.
        (None, 1.0, 0.0),
        # A fusion head's logit decides, not the distance: -1 calls every pair out of sync.
        (-1.0, 0.0, 1.0),
    ],
)
def test_sync_known_answers_of_constant_models(
    pretrained, synth_corpus, tmp_path, fusion_logit, tpr, reject
):
    path = _constant_export(pretrained, tmp_path, fusion_logit=fusion_logit)
    rc, res = _eval({**pretrained, "path": path}, "sync", f"data.url={synth_corpus}", *SYNC)
    assert rc == 0, res
    m = res["metrics"]
    assert m["tpr"] == tpr
    for kind in SYNC_KINDS:
        assert m[f"reject_{kind}"] == reject and m[f"acc_{kind}"] == 0.5
        # Every negative scores exactly as its positive: never strictly below it.
        assert m[f"pair_acc_{kind}"] == 0.0
    # Every shift scores the same: the first class wins each tie, right 1 time in 21, within
    # one class 2 times in 21 (-1.0 s and -0.9 s).
    assert m["offset_acc"] == pytest.approx(1 / 21)
    assert m["offset_acc_within1"] == pytest.approx(2 / 21)


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
    assert m["video/gain_over_scratch"] == pytest.approx(
        m["video/acc_video"] - m["video/scratch/acc_video_mean"]
    )
    assert m["video/acc_video"] == m["video/pretrained/main/acc_video"]
    out = Path(res["out_dir"])
    _check_per_class(out / "video" / "pretrained_main_per_class.csv", m["video/acc_video"])
    _check_per_class(
        out / "video" / "scratch_main_per_class.csv", m["video/scratch/main/acc_video"]
    )
    _check_per_class(out / "audio" / "folds_per_class.csv", m["audio/acc"])
    assert m["audio/num_folds"] == 1 and m["audio/num_audio_decode_errors"] == 0
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
        assert f.readline().strip() == "class,support,correct,accuracy"
    # split k tests group k: 3 classes x 2 clips per group
    for variant in ("pretrained", "scratch"):
        for k in (1, 2, 3):
            _check_per_class(
                Path(res["out_dir"]) / f"{variant}_split{k}_per_class.csv",
                m[f"{variant}/split{k}/acc_video"],
                num_test=6,
            )

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
    # The fixture's classes are pure tones of different pitch: even a random-init net's features
    # separate them, so a probe fed the right labels is exact (wrong labels: chance).
    assert m["acc"] == 1.0 and m["num_audio_decode_errors"] == 0
    rc, res = _eval(
        pretrained,
        "dcase2014",
        f"eval.datasets.dcase2014={prepared_datasets['dcase2014']['url']}",
        "eval.probe.classifier=logreg",
    )
    assert rc == 0, res
    assert res["metrics"]["num_folds"] == 2 and res["metrics"]["acc"] == 1.0
    assert _child(pretrained, res).data.params["eval.probe.classifier"] == "logreg"


def test_multimodal_counts_clips_without_audio(pretrained, prepared_datasets, layout_sources):
    url = prepared_datasets["ucf101"]["url"]
    rc, res = _eval(pretrained, "multimodal", f"eval.datasets.multimodal={url}", "eval.splits=[1]")
    assert rc == 0, res
    m = res["metrics"]
    # split 1 tests group 1: 6 clips, every other one silent
    assert m["num_test_without_audio"] == 3 == m["split1/num_test_without_audio"]
    assert m["acc"] == m["split1/acc_fused"]
    # Its audio half is a logistic regression on pure tones: exact (see the probe test above).
    assert m["acc_audio_only"] == 1.0
    _check_per_class(Path(res["out_dir"]) / "fused_per_class.csv", m["acc"], num_test=6)


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
    """Real chain: `avts train` (in-process, one rank, 2 steps) -> checkpoint dir -> `avts eval
    sync`, exported on the fly, nested under the training run's MLflow run."""
    from mlflow import MlflowClient

    from avts_dist.config import REPO_ROOT
    from tests.fixtures.in_process import avts

    run_dir = tmp_path / "run"
    uri = (tmp_path / "mlruns").as_uri()
    train = avts(
        [
            "train",
            "--config",
            str(REPO_ROOT / "configs" / "pretrain" / "quickstart.yaml"),
            f"data.url={synth_corpus}",
            f"run.dir={run_dir}",
            f"tracking.uri={uri}",
            "train.max_steps=2",
            "train.val_every_steps=0",
            "data.global_batch_size=4",
            "tracking.system_metrics=false",
            "train.progress=false",
        ],
        cwd=tmp_path,
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


def test_launch_eval_runs_the_evaluation_library(pretrained, synth_corpus, tmp_path, capsys):
    """`avts launch eval --cluster debug`: the planned job calls eval.run.evaluate in-process
    (no CLI inside), and its run nests under the parent named on the command line."""
    argv = ["launch", "eval", "--checkpoint", pretrained["path"], "--suite", "sync"]
    argv += ["--cluster", "debug", "--folder", str(tmp_path / "jobs"), "--wait", "--json"]
    argv += ["--parent-run-id", pretrained["parent"], f"tracking.uri={pretrained['uri']}"]
    argv += [f"data.url={synth_corpus}", *SYNC, "eval.progress=false"]
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary["evals"]) == ["sync"]
    assert set(summary["states"].values()) == {"COMPLETED"}
    client = pretrained["client"]
    runs = client.search_runs(
        [client.get_run(pretrained["parent"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{pretrained['parent']}'",
        order_by=["attributes.start_time DESC"],
    )
    latest = runs[0]
    assert latest.data.tags["avts.eval"] == "sync" and latest.info.status == "FINISHED"
    assert latest.data.metrics["sync/num_clips"] == 6
