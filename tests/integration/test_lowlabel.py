"""`avts eval lowlabel` end to end on a real 32 px corpus with the labelled pool (eval_train,
eval_test), logging to a real local MLflow store; and `avts compare --study` over a real store
filled with known per-cell values, checked against means and intervals computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import avts_dist.tracking.eval_runs  # noqa: F401  (allows MLflow's local file store)
from avts_dist.cli import main
from avts_dist.data import DatasetIndex
from avts_dist.data.synthetic import synthesize, use_label_set
from avts_dist.tracking.eval_runs import EvalRun
from tests.fixtures.corpus import SYNTH_CORPUS
from tests.integration.test_eval import TINY

# Student's t quantile for a 95% interval with 2 degrees of freedom (3 seeds), from tables.
T_975_DF2 = 4.3027


@pytest.fixture(scope="module")
def lowlabel_corpus(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("lowlabel_corpus") / "ds")
    synthesize(url, **dict(SYNTH_CORPUS, seed=5), eval_train_fraction=0.4, eval_test_fraction=0.25)
    return url


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> str:
    from avts_dist.config import load_config
    from avts_dist.export import export_payload, save_exported
    from avts_dist.models import build_model

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("export") / "model.pt")
    save_exported(export_payload(build_model(cfg.model), cfg.model), path)
    return path


@pytest.mark.slow
def test_lowlabel_job_writes_every_cell_to_json_and_mlflow(
    lowlabel_corpus, tiny_export, tmp_path, capsys
):
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "out"
    torch.set_num_threads(1)
    rc = main(
        [
            "eval",
            "lowlabel",
            "--checkpoint",
            tiny_export,
            "--tracking-uri",
            uri,
            "--out-dir",
            str(out),
            "--json",
            f"data.url={lowlabel_corpus}",
            "eval.lowlabel.shots=[1,0]",
            "eval.lowlabel.seeds=[3]",
            "eval.lowlabel.steps=2",
            "eval.lowlabel.scratch=true",
            "eval.batch_size=4",
            "eval.progress=false",
            "eval.device=cpu",
            "eval.seed=1",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    record = json.loads((out / "lowlabel" / "lowlabel.json").read_text())
    names = {
        f"lowlabel/rhythm/{recipe}/{init}/k{k}/f3/acc"
        for recipe in ("finetune", "probe")
        for init in ("pretrained", "scratch")
        for k in ("1", "all")
    }
    assert {c["metric"] for c in record["cells"]} == names
    idx = use_label_set(DatasetIndex.load(lowlabel_corpus), "rhythm")
    num_pool, num_test = idx.rows("eval_train").size, idx.rows("eval_test").size
    assert (record["num_eval_train"], record["num_eval_test"]) == (num_pool, num_test)
    for cell in record["cells"]:
        assert cell["num_train_clips"] == (3 if cell["k"] == "1" else num_pool)
        # Accuracy over the eval_test clips: a whole number of them right.
        assert math.isclose(cell["acc"] * num_test, round(cell["acc"] * num_test), abs_tol=1e-9)
    run = MlflowClient(tracking_uri=uri).get_run(summary["run_id"])
    logged = {k: v for k, v in run.data.metrics.items() if k.endswith("/acc")}
    assert logged == {c["metric"]: pytest.approx(c["acc"]) for c in record["cells"]}
    assert run.data.params["eval.lowlabel.steps"] == "2"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["two_stream", "early_fusion"])
def test_lowlabel_multimodal_recipes_of_both_architectures(lowlabel_corpus, tmp_path, capsys, arch):
    from avts_dist.config import load_config
    from avts_dist.export import export_payload, save_exported
    from avts_dist.models import build_model

    cfg = load_config(None, [*TINY, f"model.arch={arch}"])
    torch.manual_seed(0)
    export = str(tmp_path / "model.pt")
    save_exported(export_payload(build_model(cfg.model), cfg.model), export)
    recipes = ["multimodal"] + (["silent_audio"] if arch == "early_fusion" else [])
    rc = main(
        [
            "eval",
            "lowlabel",
            "--checkpoint",
            export,
            "--out-dir",
            str(tmp_path / "out"),
            "--json",
            f"data.url={lowlabel_corpus}",
            f"eval.lowlabel.recipes=[{','.join(recipes)}]",
            "eval.lowlabel.shots=[0]",
            "eval.lowlabel.seeds=[0]",
            "eval.lowlabel.steps=2",
            "eval.batch_size=4",
            "eval.progress=false",
            "eval.device=cpu",
            "tracking.enabled=false",
        ]
    )
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert set(metrics) == {f"rhythm/{r}/pretrained/kall/f0/acc" for r in recipes}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_lowlabel_job_refuses_what_it_cannot_run(
    lowlabel_corpus, synth_corpus, tiny_export, tmp_path, capsys
):
    args = ["eval", "lowlabel", "--checkpoint", tiny_export, "--out-dir", str(tmp_path)]
    common = [f"data.url={lowlabel_corpus}", "tracking.enabled=false", "eval.device=cpu"]
    assert main([*args, *common, "eval.lowlabel.recipes=[silent_audio]"]) != 0
    assert "silent_audio feeds an early-fusion net silence" in capsys.readouterr().err
    assert main([*args, *common, "eval.lowlabel.recipes=[audio]"]) != 0
    assert "eval.lowlabel.recipes" in capsys.readouterr().err
    assert main([*args, *common, "eval.lowlabel.shots=[64]"]) != 0
    assert "needs 64 eval_train clips per class" in capsys.readouterr().err
    assert main([*args, *common, "eval.lowlabel.label_set=colour"]) != 0
    assert "no label set 'colour'" in capsys.readouterr().err
    no_pool = [f"data.url={synth_corpus}", *common[1:]]
    assert main([*args, *no_pool]) != 0
    assert "the low-label job needs eval_train/eval_test splits" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# avts compare --study over known values

STUDY = "s1"


def _log(uri: str, study: str, arm: str, p: int, metrics: dict[str, float], job="lowlabel"):
    tags = {"avts.study": study, "avts.arm": arm, "avts.pretrain_seed": str(p)}
    run = EvalRun(job, tracking_uri=uri, experiment="study", tags=tags)
    run.log_metrics(metrics)
    run.end()


def _cells(init: str, k: str, values: list[float], recipe="finetune", label_set="rhythm"):
    return {f"lowlabel/{label_set}/{recipe}/{init}/k{k}/f{f}/acc": v for f, v in enumerate(values)}


@pytest.fixture(scope="module")
def study_store(tmp_path_factory) -> str:
    uri = (tmp_path_factory.mktemp("study") / "mlruns").as_uri()
    avts_f = {0: [0.5, 0.6, 0.7], 1: [0.7, 0.7, 0.7], 2: [0.8, 0.8, 0.8]}  # per-p means .6 .7 .8
    scratch = {0: 0.4, 1: 0.5, 2: 0.5}
    for p in (0, 1, 2):
        _log(
            uri,
            STUDY,
            "avts",
            p,
            {**_cells("pretrained", "1", avts_f[p]), **_cells("scratch", "1", [scratch[p]] * 3)},
        )
        offset = {"sync/offset_acc": 0.2 + 0.1 * p}
        _log(uri, STUDY, "avts", p, {"sync/acc_hard": 0.6 + 0.1 * p, **offset}, job="sync")
        offset = {"sync/offset_acc": [0.1, 0.2, 0.6][p]}
        _log(
            uri,
            STUDY,
            "early_fusion",
            p,
            {"sync/acc_hard": [0.5, 0.6, 0.9][p], **offset},
            job="sync",
        )
    _log(uri, STUDY, "video_ssl", 0, _cells("pretrained", "1", [0.3, 0.4, 0.5]))
    _log(uri, "another_study", "avts", 0, _cells("pretrained", "2", [0.99] * 3))
    return uri


def test_compare_study_tables_match_hand_computed_intervals(study_store, tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["compare", "--study", STUDY, "--tracking-uri", study_store, "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert md in printed
    # avts k=1: per-p means 0.6, 0.7, 0.8 -> 0.7 +- t * 0.1 / sqrt(3).
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    # gain over scratch: 0.2, 0.2, 0.3 -> 0.2333 +- t * sd / sqrt(3).
    gain_sd = float(np.std([0.2, 0.2, 0.3], ddof=1))
    gain_half = T_975_DF2 * gain_sd / math.sqrt(3)
    row = f"| finetune | 1 | 0.700 ± {half:.3f} (n=3) | 0.467 ± "
    assert row in md
    assert f"| +0.233 ± {gain_half:.3f} (n=3) |" in md
    assert "| finetune | 2 | not run | not run | not run |" in md  # another study's k=2 ignored
    assert "| finetune | 1 | 0.700 ± " in md and "| 0.400 (n=1) |" in md  # video_ssl: p=0 only
    tables = json.loads((out / "results.json").read_text())["tables"]
    t1 = next(r for r in tables["T1"]["rows"] if r[:2] == ["finetune", "1"])
    assert t1[2]["mean"] == pytest.approx(0.7) and t1[2]["n"] == 3
    assert t1[2]["half_width"] == pytest.approx(half, rel=1e-4)
    assert t1[4]["mean"] == pytest.approx(0.7 - np.mean([0.4, 0.5, 0.5]))
    assert t1[4]["half_width"] == pytest.approx(gain_half, rel=1e-4)
    # T3 sync hard: early_fusion - avts = -0.1, -0.1, +0.1 over p.
    t3 = next(r for r in tables["T3"]["rows"] if r[0] == "sync hard")
    assert t3[3]["mean"] == pytest.approx(-0.1 / 3)
    sd = float(np.std([-0.1, -0.1, 0.1], ddof=1))
    assert t3[3]["half_width"] == pytest.approx(T_975_DF2 * sd / math.sqrt(3), rel=1e-4)
    mm = next(r for r in tables["T3"]["rows"] if r[0] == "multimodal fine-tune, k=all")
    assert mm[1:] == ["not run"] * 3
    t5 = tables["T5"]["rows"]
    assert all(c == "not run" for r in t5 for c in r[2:])
    # T6 offset classification: avts 0.2, 0.3, 0.4; early_fusion - avts = -0.1, -0.1, +0.2.
    t6 = {r[0]: r[1:] for r in tables["T6"]["rows"]}
    assert t6["avts"][0]["mean"] == pytest.approx(0.3) and t6["avts"][0]["n"] == 3
    assert t6["avts"][1] == "not run"  # no offset_acc_within1 logged
    assert t6["early_fusion − avts"][0]["mean"] == pytest.approx(0.0)
    sd = float(np.std([-0.1, -0.1, 0.2], ddof=1))
    assert t6["early_fusion − avts"][0]["half_width"] == pytest.approx(
        T_975_DF2 * sd / math.sqrt(3), rel=1e-4
    )
    assert (out / "accuracy_vs_k.png").stat().st_size > 1000


def test_compare_study_without_runs_is_one_clear_error(study_store, capsys):
    assert main(["compare", "--study", "nobody", "--tracking-uri", study_store]) != 0
    assert "no MLflow runs tagged avts.study='nobody'" in capsys.readouterr().err
    assert main(["compare", "--study", STUDY, "--experiment", "study"]) != 0
    assert "takes only --out and --tracking-uri" in capsys.readouterr().err
