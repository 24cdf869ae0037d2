"""The evaluation config: typed sub-configs merged strictly, the old flat key names still
accepted (renamed), and the registry's dataset rules."""

from __future__ import annotations

import logging

import pytest
import yaml

from avts_dist.config import ConfigError, config_from_dict, config_to_dict, load_config
from eval.registry import JOBS, EvalError, dataset_url


def test_nested_keys_merge_strictly():
    cfg = load_config(
        None,
        [
            "eval.sync.max_clips=5",
            "eval.sync.offsets=[0.5]",
            "eval.finetune.epochs=2",
            "eval.finetune.dropout=0.1",
            "eval.probe.classifier=logreg",
            "eval.probe.windows=4",
        ],
    )
    ev = cfg.eval
    assert (ev.sync.max_clips, ev.sync.offsets, ev.finetune.epochs) == (5, [0.5], 2)
    assert (ev.finetune.dropout, ev.probe.classifier, ev.probe.windows) == (0.1, "logreg", 4)


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.probe.classifier=forest", "eval.probe.classifier"),
        ("eval.finetune.epochs=0", "eval.finetune.epochs"),
        ("eval.sync.offsets=[0.5,-1]", "eval.sync.offsets"),
        ("eval.device=tpu", "eval.device"),
        ("eval.splits=[4]", "eval.splits"),
        ("eval.sync.maxclips=3", "maxclips"),
    ],
)
def test_bad_eval_keys_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


OLD_TO_NEW = {
    "eval.sync_split=test": ("sync", "split", "test"),
    "eval.sync_max_clips=7": ("sync", "max_clips", 7),
    "eval.sync_threshold=0.3": ("sync", "threshold", 0.3),
    "eval.sync_offsets=[1.0]": ("sync", "offsets", [1.0]),
    "eval.epochs=9": ("finetune", "epochs", 9),
    "eval.lr=0.01": ("finetune", "lr", 0.01),
    "eval.weight_decay=0.5": ("finetune", "weight_decay", 0.5),
    "eval.clips_per_video=4": ("finetune", "clips_per_video", 4),
    "eval.scratch_baseline=false": ("finetune", "scratch_baseline", False),
    "eval.feature_layer=layer3": ("probe", "feature_layer", "layer3"),
    "eval.classifier=logreg": ("probe", "classifier", "logreg"),
    "eval.svm_c=2.0": ("probe", "c", 2.0),
    "eval.audio_windows=6": ("probe", "windows", 6),
}


def test_old_flat_keys_still_work_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="avts.config")
    ev = load_config(None, [*OLD_TO_NEW, "eval.suite=[sync]"]).eval
    for section, name, value in OLD_TO_NEW.values():
        assert getattr(getattr(ev, section), name) == value
    assert "'eval.epochs' is now 'eval.finetune.epochs'" in caplog.text
    assert "'eval.suite' was removed" in caplog.text


def test_saved_configs_with_old_keys_load(tmp_path):
    """A run's config.yaml written before the rename (what `avts eval` reads as its base)."""
    old = config_to_dict(load_config(None))
    new_eval = old.pop("eval")
    old["eval"] = {
        "checkpoint": "",
        "suite": ["sync"],
        "splits": [2],
        "sync_max_clips": 11,
        "epochs": 3,
        "classifier": "logreg",
        "datasets": new_eval["datasets"],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    for cfg in (load_config(path), config_from_dict(old)):
        assert cfg.eval.splits == [2] and cfg.eval.sync.max_clips == 11
        assert cfg.eval.finetune.epochs == 3 and cfg.eval.probe.classifier == "logreg"
    saved = config_to_dict(load_config(path))["eval"]
    assert "sync_max_clips" not in saved and saved["sync"]["max_clips"] == 11


def test_dataset_url_rules():
    assert dataset_url(JOBS["sync"], {}, "data/synth") == "data/synth"
    assert dataset_url(JOBS["synthetic"], {"synthetic": "s3://b/x"}, "data/synth") == "s3://b/x"
    with pytest.raises(EvalError, match="eval.datasets.ucf101"):
        dataset_url(JOBS["ucf101"], {}, "data/synth")
    with pytest.raises(EvalError, match=r"unknown evaluation\(s\) \['ucf'\]"):
        dataset_url(JOBS["ucf101"], {"ucf": "data/ucf"}, "data/synth")


def test_eval_package_doc_lists_every_registered_job():
    import eval

    lines = eval.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=")]
    rows = lines[rules[1] + 1 : rules[2]]  # the table's body, between its last two rules
    assert {line.split()[0] for line in rows if line[:1].isalpha()} == set(eval.JOBS)
