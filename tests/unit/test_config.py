"""The typed config tree: layer order, strictness, errors that name the key, saving."""

from __future__ import annotations

import pytest
import yaml

from avts_dist.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    flatten_config,
    load_config,
    save_config,
)


def test_defaults_load_and_fill_derived_paths():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.run.dir == "runs/avts"
    assert cfg.checkpoint.dir == "runs/avts/checkpoints"


def test_layers_merge_in_order(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"fps": 4.0, "size": 48}, "run": {"name": "base"}}))
    frag = tmp_path / "frag.yaml"
    frag.write_text(yaml.safe_dump({"optim": {"lr": 0.5}}))
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump({"base": "base.yaml", "includes": ["frag.yaml"], "data": {"size": 64}})
    )
    cfg = load_config(child, overrides=["run.name=cli", "optim.lr=0.25"])
    assert cfg.data.fps == 4.0  # from base
    assert cfg.data.size == 64  # child over base
    assert cfg.optim.lr == 0.25  # command line over include
    assert cfg.run.name == "cli"
    assert cfg.run.dir == "runs/cli"  # derived after every layer


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.no_such_key=1"], "data.no_such_key"),
        (["data.fps=fast"], "data.fps"),
        (["data.min_shift=9"], "data.min_shift"),
        (["deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
        (["data.negative_mix={easy: 0.5, medium: 0.5}"], "data.negative_mix"),
        (
            ["data.global_batch_size=6", "deepspeed.grad_accum_steps=4"],
            "deepspeed.grad_accum_steps",
        ),
        (["launch.time=forever"], "launch.time"),
        (["nonsense=1"], "nonsense"),
        # Literal fields: OmegaConf names the key and the allowed values.
        (["deepspeed.backend=mpi"], "deepspeed.backend"),
        (["deepspeed.precision=fp16"], "deepspeed.precision"),
        (["optim.name=lamb"], "optim.name"),
        (["loss.negatives=some"], "loss.negatives"),
        (["model.video_arch=resnet"], "model.video_arch"),
        # The one epoch knob: a run needs a length.
        (["train.max_steps=0"], "train.max_steps"),
        (["train.epochs=3"], "train.epochs"),  # gone: data.epochs is the knob
        (["train.inject_nan_at_steps=[2]"], "train.inject_nan_at_steps"),  # test hooks moved out
    ],
)
def test_bad_values_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("train.grad_accum_steps=2", "Did you mean: 'deepspeed.grad_accum_steps'?"),
        ("train.epochs=3", "Did you mean: 'data.epochs' or 'eval.finetune.epochs'?"),
        ("train.max_step=2", "Did you mean: 'max_steps'?"),  # OmegaConf's, within the section
        ("train.nonsense=1", None),
    ],
)
def test_a_key_of_another_section_is_named(override, hint):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    msg = str(info.value)
    assert msg.startswith(f"config key '{override.split('=')[0]}': ")
    if hint is None:
        assert "Did you mean" not in msg, msg
    else:
        assert msg.endswith(hint) and msg.count("Did you mean") == 1, msg


def test_curriculum_stage_without_trigger_is_rejected():
    with pytest.raises(ConfigError, match="curriculum.stages.0"):
        load_config(overrides=["curriculum.stages=[{name: a}, {name: b}]"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text("base: cyc.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cyc)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(
        overrides=["data.fps=5", "curriculum.stages=[{name: e, until_step: 3}, {name: h}]"]
    )
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg)


def test_flatten_for_params():
    flat = flatten_config(load_config(overrides=["data.negative_mix={easy: 0.75, hard: 0.25}"]))
    assert flat["data.negative_mix.hard"] == 0.25
    assert flat["model.video_layers"] == "[2, 2, 2, 2]"
    assert all(not isinstance(v, (dict, list)) for v in flat.values())


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("pretrain/*.yaml"))
    for f in files:
        load_config(f)


def test_literal_errors_list_the_choices():
    with pytest.raises(
        ConfigError, match=r"deepspeed.precision.*expected one of \['fp32', 'bf16'\]"
    ):
        load_config(overrides=["deepspeed.precision=fp16"])


def test_run_length_from_data_epochs():
    cfg = load_config(overrides=["data.epochs=3", "train.max_steps=0"])
    assert cfg.data.epochs == 3 and cfg.train.max_steps == 0
    assert load_config(overrides=["deepspeed.precision=bf16"]).deepspeed.zero_stage == 0


# ---- data.negative_mix against the curriculum (a fix: the curriculum overwrote it silently) ----


def test_data_negative_mix_is_the_mix_where_no_stage_sets_one():
    from avts_dist.curriculum import Curriculum

    cfg = load_config(overrides=["data.negative_mix={easy: 3, hard: 1}"])
    assert cfg.curriculum.stages[0].negative_mix == {"easy": 3.0, "hard": 1.0}
    # What the trainer pushes to the loader at step 0 (it was easy only, whatever the user set).
    assert Curriculum(cfg.curriculum).negative_mix == {"easy": 0.75, "hard": 0.25}
    two = load_config(
        overrides=[
            "data.negative_mix={hard: 1}",
            "curriculum.stages=[{name: a, until_step: 5}, {name: b}]",
        ]
    )
    assert [s.negative_mix for s in two.curriculum.stages] == [{"hard": 1.0}] * 2
    # The saved config reads back: stages that hold data's mix are no conflict.
    assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg)
    assert load_config().curriculum.stages[0].negative_mix == {"easy": 1.0}  # the default


def test_data_negative_mix_where_a_stage_sets_one_is_one_clear_error():
    with pytest.raises(ConfigError) as info:
        load_config("configs/pretrain/quickstart.yaml", ["data.negative_mix={hard: 1.0}"])
    message = str(info.value)
    assert message.startswith("config key 'data.negative_mix': ")
    assert "curriculum.stages.0.negative_mix" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"'data.negative_mix'.*curriculum.stages.1"):
        load_config(
            overrides=[
                "data.negative_mix={easy: 1}",
                "curriculum.stages=[{name: a, until_step: 5}, {name: b, negative_mix: {hard: 1}}]",
            ]
        )
    # The same mix in both places says one thing: accepted.
    same = load_config(
        overrides=[
            "data.negative_mix={easy: 0.5, hard: 0.5}",
            "curriculum.stages=[{name: a, negative_mix: {easy: 0.5, hard: 0.5}}]",
        ]
    )
    assert same.curriculum.stages[0].negative_mix == {"easy": 0.5, "hard": 0.5}


# ---- the config <-> storage cycle is gone: redaction is the leaf avts_dist.secrets ----


def _imported_modules(path) -> set[str]:
    """Every module a file imports, function-local imports included."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_config_imports_no_storage_and_secrets_is_a_leaf():
    import subprocess
    import sys
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "avts_dist"
    config_files = sorted((package / "config").glob("*.py"))
    assert len(config_files) > 5
    for path in config_files:
        assert not any(m.startswith("avts_dist.storage") for m in _imported_modules(path)), path
    assert not any(m.startswith("avts_dist") for m in _imported_modules(package / "secrets.py"))
    assert "avts_dist.secrets" in _imported_modules(package / "storage.py")
    code = (
        "import sys, avts_dist.config; a = 'avts_dist.storage' in sys.modules; "
        "import avts_dist.secrets as s; print(a, sorted(m for m in sys.modules "
        "if m.startswith('avts_dist') and not m.startswith('avts_dist.config')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out[0] == "False"  # importing the config loads no storage
    assert "".join(out[1:]) == "['avts_dist','avts_dist.secrets']"
