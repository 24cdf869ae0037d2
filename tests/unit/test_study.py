"""`avts study`: the study YAML (typed, validated) and its expansion into arms x seeds with each
pretrained net's evaluations (launch/study/); nothing here trains."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from avts_dist.cli import main as avts_main
from avts_dist.config import REPO_ROOT, ConfigError
from launch import study as S
from launch.study.execute import write_corpus

MAIN = str(REPO_ROOT / "configs" / "study" / "main.yaml")
SMOKE = str(REPO_ROOT / "configs" / "study" / "smoke.yaml")
SYNC_ONLY = ["evals.lowlabel_rhythm.arms=[]"]


def _override(items: list[str], key: str) -> str:
    values = [i.split("=", 1)[1] for i in items if i.startswith(f"{key}=")]
    assert len(values) == 1, (key, items)
    return values[0]


def test_main_study_is_the_protocol_grid(tmp_path):
    study = S.load_study(MAIN, [f"runs={tmp_path}"])
    units = S.expand(study)
    arms = ["avts", "avts_no_curriculum", "avts_superhard", "early_fusion", "video_ssl"]
    assert [(u.arm, u.seed) for u in units] == [(a, p) for a in arms for p in (0, 1, 2)]
    assert len({u.run_dir for u in units}) == 15
    for unit in units:
        tags = json.loads(_override(unit.overrides, "tracking.tags"))
        assert tags == {
            "avts.study": "main",
            "avts.arm": unit.arm,
            "avts.pretrain_seed": str(unit.seed),
        }
        assert _override(unit.overrides, "data.seed") == str(unit.seed)
        assert _override(unit.overrides, "loss.seed") == str(unit.seed)
        assert _override(unit.overrides, "data.url") == "data/study"
        assert _override(unit.overrides, "tracking.experiment") == "main"
        for ev in unit.evals:
            assert _override(ev.overrides, "eval.seed") == str(unit.seed)
            eval_tags = json.loads(_override(ev.overrides, "tracking.tags"))
            assert eval_tags == {**tags, "avts.study_eval": ev.name}
    evals = {(u.arm, e.name): e for u in units if u.seed == 0 for e in u.evals}
    # 1.6/1.7: the scratch baseline once per p, on the avts arm only; T5 on avts only; no sync
    # for video_ssl (no audio net); the low-label job on the four video arms.
    scratch = {k for k, e in evals.items() if "eval.lowlabel.scratch=true" in e.overrides}
    assert scratch == {("avts", "lowlabel_rhythm"), ("avts", "lowlabel_appearance")}
    assert {a for a, n in evals if n == "sync"} == set(arms) - {"video_ssl"}
    assert {a for a, n in evals if n == "lowlabel_rhythm"} == set(arms) - {"early_fusion"}
    assert {a for a, n in evals if n == "lowlabel_appearance"} == {"avts"}
    assert {a for a, n in evals if n == "lowlabel_t3"} == {"avts", "early_fusion"}
    t3 = _override(evals[("early_fusion", "lowlabel_t3")].overrides, "eval.lowlabel.recipes")
    assert t3 == "[multimodal, silent_audio, finetune, probe]"


def test_study_writes_the_corpus_of_its_synth_command(tmp_path):
    """The corpus goes through `synthesize` (no CLI in-process); its bytes are those of the
    `avts synth` command the plan prints."""
    tiny = ["num_videos=6", "seconds=1", "size=16", "shard_size=3", "num_workers=1"]
    overrides = [f"corpus.{o}" for o in tiny] + [f"corpus.out={tmp_path / 'study'}"]
    study = S.load_study(SMOKE, [*SYNC_ONLY, f"runs={tmp_path / 'runs'}", *overrides])
    said = []
    write_corpus(SimpleNamespace(study=study, corpus_exists=False), said.append)
    argv = S.synth_argv(study)
    assert said[0] == "writing the corpus: avts " + " ".join(argv)
    assert said[1].startswith(f"wrote 6 clips (6 ok) in 2 shards to {tmp_path / 'study'}")
    cli_out = tmp_path / "cli"
    assert avts_main([*argv, "--out", str(cli_out)]) == 0
    written = sorted(p.relative_to(tmp_path / "study") for p in (tmp_path / "study").rglob("*"))
    assert written == sorted(p.relative_to(cli_out) for p in cli_out.rglob("*"))
    shards = [p for p in written if p.suffix == ".tar"]
    assert len(shards) == 2
    for rel in shards:
        assert (tmp_path / "study" / rel).read_bytes() == (cli_out / rel).read_bytes()


def test_synth_command_is_the_protocol_corpus():
    argv = S.synth_argv(S.load_study(MAIN))
    assert " ".join(argv) == (
        "synth --out data/study --num-videos 480 --seconds 4 --fps 8 --size 32 "
        "--sample-rate 16000 --num-classes 4 --shard-size 32 --seed 0 --val-fraction 0.1 "
        "--eval-train-fraction 0.25 --eval-test-fraction 0.15"
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("arms.avts.overide=[]", "arms.avts.overide"),
        ("evals.sync.arms=[avts, nope]", "evals.sync.arms"),
        ("seeds=[0, 0]", "seeds"),
        ("name=a/b", "name"),
        ("corpus.frames=8", "corpus.frames"),
    ],
)
def test_bad_study_keys_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        study = S.load_study(SMOKE, [override])
        S.synth_argv(study)


def test_bad_arm_override_fails_at_plan_naming_arm_and_key(tmp_path):
    study = S.load_study(
        SMOKE, [*SYNC_ONLY, f"runs={tmp_path}", "arms.avts.overrides=[model.nope=1]"]
    )
    with pytest.raises(ConfigError, match=r"arms\.avts: .*model\.nope"):
        S.plan(study, "debug")


def test_cli_unknown_key_is_one_line_exit_2(capsys):
    assert avts_main(["study", "--config", SMOKE, "--dry-run", "colour=red"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "colour" in err[0]


def test_dry_run_prints_arrays_and_runs_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["study", "--config", SMOKE, "--cluster", "debug", "--dry-run", "--runs", str(runs)]
    argv += [*SYNC_ONLY, f"corpus.out={tmp_path / 'data'}"]
    assert avts_main(argv) == 0
    out = capsys.readouterr().out
    assert "job array smoke-pretrain: 2 element(s): 0=avts/p0, 1=avts_no_curriculum/p0" in out
    assert "job array smoke-eval: 2 element(s) with dependency aftercorr on smoke-pretrain" in out
    assert f"corpus {tmp_path / 'data'}: to write: avts synth" in out
    assert not runs.exists() and not (tmp_path / "data").exists()
