"""tests/benchmarks/sim_scale.py on the checked-in inputs: every figure follows from its inputs,
every input says where it comes from, and fresh benchmark JSON or flags replace them."""

from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks.sim_scale import DEFAULT_INPUTS, main


def _run(tmp_path, *argv) -> dict:
    out = tmp_path / "scale.json"
    assert main(["--out", str(out), *argv]) == 0
    return json.loads(out.read_text())


def _entries(inputs: dict):
    for name, entry in inputs.items():
        if name == "access":
            for access, figures in entry.items():
                for key, item in figures.items():
                    yield f"access.{access}.{key}", item
        else:
            yield name, entry


def test_budget_follows_from_the_checked_in_inputs(tmp_path):
    result = _run(tmp_path)
    inputs = json.loads(DEFAULT_INPUTS.read_text())
    assert result["inputs"] == inputs
    for name, entry in _entries(inputs):
        assert entry["status"] in ("measured", "assumed") and entry["source"], name
        assert entry["value"], f"{name} was never filled in"
    assumed = " ".join(result["assumed"])
    # The GPU rate stays assumed until a GPU is lent; the access figures are measured.
    assert "clips_per_s_per_gpu" in assumed and "access.block.gets_per_sample" not in assumed

    rows = {(r["num_gpus"], r["access"]): r for r in result["rows"]}
    assert set(rows) == {(n, a) for n in (8, 64, 512) for a in ("random", "block")}
    rate = inputs["clips_per_s_per_gpu"]["value"]
    per_prefix = inputs["s3_get_per_s_per_prefix"]["value"]
    for (num_gpus, access), row in rows.items():
        gets = inputs["access"][access]["gets_per_sample"]["value"]
        assert row["num_nodes"] == num_gpus // 8
        assert row["get_per_s_total"] == pytest.approx(num_gpus * rate * gets)
        assert row["get_per_s_per_node"] * row["num_nodes"] == pytest.approx(row["get_per_s_total"])
        assert row["s3_prefixes_needed"] == math.ceil(row["get_per_s_total"] / per_prefix)
        assert row["request_usd_per_hour"] == pytest.approx(
            row["get_per_s_total"] * 3600 * inputs["usd_per_1000_get"]["value"] / 1000
        )
        assert row["epoch_s"] == pytest.approx(2e6 / (num_gpus * rate))
        # The training profile is what makes decoding affordable, and smaller on the wire.
        assert row["decode_cpu_cores_per_gpu_360p_source"] > 2 * row["decode_cpu_cores_per_gpu"]
        assert row["MB_per_s_per_node_360p_source"] > row["MB_per_s_per_node"]
    for num_gpus in (8, 64, 512):
        random, block = rows[(num_gpus, "random")], rows[(num_gpus, "block")]
        assert block["get_per_s_total"] < random["get_per_s_total"] / 10
        assert block["request_cpu_cores_per_node"] < random["request_cpu_cores_per_node"]
    # The gather is latency-bound: its share of the step grows with the number of GPUs.
    shares = [rows[(n, "block")]["gather_over_model_compute"] for n in (8, 64, 512)]
    assert shares == sorted(shares) and shares[-1] > 10 * shares[0]
    # More nodes share the optimizer states' writing: saves get no slower.
    saves = [rows[(n, "block")]["checkpoint_save_s"] for n in (8, 64, 512)]
    assert saves == sorted(saves, reverse=True)


def test_benchmark_json_and_flags_replace_inputs(tmp_path):
    decode = {
        "default_in_code": "torchcodec",
        "sources": {"training_profile": {"bytes": 200_000}, "360p_default_gop": {"bytes": 700_000}},
        "cpu_ms_per_clip": {
            "training_profile": {"torchcodec": {"clip_cpu_ms": {"mean": 10.0}}},
            "360p_default_gop": {"torchcodec": {"clip_cpu_ms": {"mean": 70.0}}},
        },
        "audio_cpu_ms_per_sample": {
            "same_clip_negative_cpu_ms": {"mean": 3.0},
            "other_clip_negative_cpu_ms": {"mean": 6.0},
        },
    }
    path = tmp_path / "decode.json"
    path.write_text(json.dumps(decode))
    result = _run(tmp_path, "--decode-json", str(path), "--clips-per-s-per-gpu", "250")
    assert result["inputs"]["video_cpu_ms_per_clip"]["value"] == 10.0
    assert "decode.json" in result["inputs"]["clip_bytes"]["source"]
    row = next(r for r in result["rows"] if r["num_gpus"] == 8 and r["access"] == "random")
    # 1:1:1 mix: a third of the samples decode another clip's audio (6 ms), the rest 3 ms.
    assert row["decode_cpu_cores_per_gpu"] == pytest.approx(250 * (10.0 + 4.0) / 1000)
    ratio = json.loads(DEFAULT_INPUTS.read_text())["access"]["random"]["bytes_per_sample_over_clip"]
    assert row["MB_per_s_per_node"] == pytest.approx(8 * 250 * 200_000 * ratio["value"] / 1e6)
    assert row["clips_per_s"] == 8 * 250


def test_unknown_gpu_count_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.json"), "--gpus", "16"])
