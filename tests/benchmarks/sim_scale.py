"""The data path's budget at AudioSet scale, on paper, from our own benchmark figures.

python tests/benchmarks/sim_scale.py --out scale.json [--inputs tests/benchmarks/scale_inputs.json]
    [--decode-json decode.json] [--clips-per-s-per-gpu 500] [--block-gets-per-sample 0.05]
    [--block-bytes-ratio 1.10]

AudioSet-2M (2M clips x 10 s) on 8, 64 and 512 GPUs (8 per node), ``random`` and ``block``
access side by side: GET/s per node and in total against S3's per-prefix rate, request fees per
hour, MB/s per node, CPU cores per GPU to decode at the compute rate, checkpoint size and save
time, the gather cost (the cost model of tests/benchmarks/bench_loss.py, see
docs/loss-and-curriculum.md) and what one preemption costs.

Every input sits in the inputs file with its unit, its source and ``measured`` or ``assumed``;
``--decode-json`` replaces the decode figures with those of a fresh
``tests/benchmarks/bench_decode.py`` run, and the flags replace the assumed rates. The output
JSON repeats the inputs it used, so every figure can be traced. See docs/scale.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.bench_loss import cost_model  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_INPUTS = HERE / "scale_inputs.json"
ACCESS = ("random", "block")


def value(inputs: dict, name: str) -> float:
    return inputs[name]["value"]


def inputs_from_decode_json(inputs: dict, decode: dict, path: str) -> dict:
    """The decode figures of a bench_decode.py JSON, with their JSON keys as the source."""
    out = copy.deepcopy(inputs)
    decoder = decode["default_in_code"]
    profile = decode["cpu_ms_per_clip"]["training_profile"][decoder]["clip_cpu_ms"]["mean"]
    source = decode["cpu_ms_per_clip"]["360p_default_gop"][decoder]["clip_cpu_ms"]["mean"]
    audio = decode["audio_cpu_ms_per_sample"]
    updates = {
        "video_cpu_ms_per_clip": (
            profile,
            f"cpu_ms_per_clip.training_profile.{decoder}.clip_cpu_ms.mean",
        ),
        "video_cpu_ms_per_clip_360p_source": (
            source,
            f"cpu_ms_per_clip.360p_default_gop.{decoder}.clip_cpu_ms.mean",
        ),
        "audio_cpu_ms_same_clip_negative": (
            audio["same_clip_negative_cpu_ms"]["mean"],
            "audio_cpu_ms_per_sample.same_clip_negative_cpu_ms.mean",
        ),
        "audio_cpu_ms_other_clip_negative": (
            audio["other_clip_negative_cpu_ms"]["mean"],
            "audio_cpu_ms_per_sample.other_clip_negative_cpu_ms.mean",
        ),
        "clip_bytes": (decode["sources"]["training_profile"]["bytes"], "sources.training_profile.bytes"),
        "clip_bytes_360p_source": (
            decode["sources"]["360p_default_gop"]["bytes"],
            "sources.360p_default_gop.bytes",
        ),
    }  # fmt: skip
    for name, (number, key) in updates.items():
        out[name] = {**out[name], "value": number, "status": "measured", "source": f"{path}: {key}"}
    return out


def _audio_ms(inputs: dict) -> float:
    """Audio CPU per sample under the negative mix: easy negatives come from another clip."""
    mix = inputs["negative_mix"]["value"]
    easy = mix["easy"] / sum(mix.values())
    same = value(inputs, "audio_cpu_ms_same_clip_negative")
    other = value(inputs, "audio_cpu_ms_other_clip_negative")
    return easy * other + (1 - easy) * same


def _checkpoint(inputs: dict, num_nodes: int) -> dict:
    """ZeRO-1: the module states are one file (one writer); the optimizer states are split over
    every data-parallel rank, so each node writes 1/num_nodes of them, in parallel."""
    params = value(inputs, "num_params")
    total = params * value(inputs, "checkpoint_bytes_per_param")
    module = params * value(inputs, "module_bytes_per_param")
    per_node_mb = (module + (total - module) / num_nodes) / 1e6
    save_s = per_node_mb / value(inputs, "checkpoint_write_MBps_per_node")
    # To resume, every node reads the module states and its own optimizer shard.
    load_s = per_node_mb / value(inputs, "checkpoint_read_MBps_per_node")
    return {"checkpoint_GB": total / 1e9, "checkpoint_save_s": save_s, "checkpoint_load_s": load_s}


def _gather(inputs: dict, num_gpus: int) -> dict:
    """The loss's embedding gather from bench_loss.cost_model, at the rate this budget assumes:
    the achieved TFLOP/s is what ``clips_per_s_per_gpu`` implies for the model's FLOPs."""
    model_gmacs = value(inputs, "model_gmacs_per_clip")
    rate = value(inputs, "clips_per_s_per_gpu")
    args = SimpleNamespace(
        bytes_per_elem=4,
        global_batch=int(value(inputs, "global_batch")),
        link_gbps=value(inputs, "link_GBps_per_gpu"),
        hop_latency_us=value(inputs, "ring_hop_latency_us"),
        gpu_tflops=rate * 6 * model_gmacs * 1e9 / 1e12,
        model_gmacs=model_gmacs,
        num_params=value(inputs, "num_params"),
    )
    dim = int(value(inputs, "embed_dim"))
    row = next(
        r for r in cost_model(args) if r["num_gpus"] == num_gpus and r["embed_dim"] == dim
    )  # cost_model covers 8, 64 and 512 GPUs
    return {
        "global_batch": row["global_batch"],
        "local_batch": row["local_batch"],
        "gather_ms_per_step": row["gather_ms"],
        "model_compute_ms_per_step": row["model_compute_ms"],
        "gather_over_model_compute": row["gather_over_model_compute"],
    }


def simulate(inputs: dict, gpu_counts: tuple[int, ...] = (8, 64, 512)) -> list[dict]:
    gpus_per_node = int(value(inputs, "gpus_per_node"))
    rate = value(inputs, "clips_per_s_per_gpu")
    video_ms = value(inputs, "video_cpu_ms_per_clip")
    video_ms_source = value(inputs, "video_cpu_ms_per_clip_360p_source")
    audio_ms = _audio_ms(inputs)
    rows = []
    for num_gpus in gpu_counts:
        num_nodes = max(1, num_gpus // gpus_per_node)
        clips_per_s = num_gpus * rate
        per_node = gpus_per_node * rate
        # What one preemption costs: the work since the last checkpoint (half the interval on
        # average) plus the restart (start-up, index load, checkpoint load); the data position
        # resumes exactly, so no data is replayed beyond that.
        ckpt = _checkpoint(inputs, num_nodes)
        restart_s = (value(inputs, "restart_startup_s") + value(inputs, "index_load_s")) + ckpt[
            "checkpoint_load_s"
        ]
        lost_s = value(inputs, "checkpoint_every_s") / 2 + restart_s
        common = {
            "num_gpus": num_gpus,
            "num_nodes": num_nodes,
            "clips_per_s": clips_per_s,
            "epoch_s": value(inputs, "num_clips") / clips_per_s,
            "decode_cpu_cores_per_gpu": rate * (video_ms + audio_ms) / 1000,
            "decode_cpu_cores_per_gpu_360p_source": rate * (video_ms_source + audio_ms) / 1000,
            **ckpt,
            **_gather(inputs, num_gpus),
            "preemption_restart_s": restart_s,
            "preemption_lost_s": lost_s,
            "preemption_gpu_hours": num_gpus * lost_s / 3600,
        }
        for access in ACCESS:
            gets = inputs["access"][access]["gets_per_sample"]["value"]
            ratio = inputs["access"][access]["bytes_per_sample_over_clip"]["value"]
            gets_per_s = clips_per_s * gets
            rows.append(
                {
                    **common,
                    "access": access,
                    "get_per_s_per_node": per_node * gets,
                    "get_per_s_total": gets_per_s,
                    "s3_prefixes_needed": math.ceil(
                        gets_per_s / value(inputs, "s3_get_per_s_per_prefix")
                    ),
                    "request_usd_per_hour": gets_per_s
                    * 3600
                    * value(inputs, "usd_per_1000_get")
                    / 1000,
                    "MB_per_s_per_node": per_node * value(inputs, "clip_bytes") * ratio / 1e6,
                    "MB_per_s_per_node_360p_source": per_node
                    * value(inputs, "clip_bytes_360p_source")
                    * ratio
                    / 1e6,
                    "request_cpu_cores_per_node": per_node
                    * gets
                    * value(inputs, "client_cpu_ms_per_request")
                    / 1000,
                }
            )
            rows[-1]["cpu_cores_per_node"] = (
                gpus_per_node * rows[-1]["decode_cpu_cores_per_gpu"]
                + rows[-1]["request_cpu_cores_per_node"]
            )
    return rows


def assumptions(inputs: dict) -> list[str]:
    """Every input marked assumed, in words, for the JSON and docs/scale.md."""
    out = []
    for name, entry in inputs.items():
        if name == "access":
            for access, figures in entry.items():
                for key, item in figures.items():
                    if item["status"] == "assumed":
                        out.append(f"access.{access}.{key} = {item['value']}: {item['source']}")
        elif isinstance(entry, dict) and entry.get("status") == "assumed":
            out.append(f"{name} = {entry['value']}: {entry['source']}")
    return out


def inputs_markdown(inputs: dict) -> str:
    """The inputs table of docs/scale.md."""
    lines = ["| input | value | unit | status | source |", "|---|---|---|---|---|"]
    flat = []
    for name, entry in inputs.items():
        if name == "access":
            flat += [
                (f"access.{access}.{key}", item)
                for access, figures in entry.items()
                for key, item in figures.items()
            ]
        else:
            flat.append((name, entry))
    for name, item in flat:
        number = item["value"]
        if isinstance(number, float):
            number = f"{number:,.4g}"
        elif isinstance(number, int):
            number = f"{number:,}"
        lines.append(
            f"| `{name}` | {number} | {item.get('unit', '')} | {item['status']} | {item['source']} |"
        )
    return "\n".join(lines) + "\n"


def to_markdown(rows: list[dict]) -> str:
    """The two tables of docs/scale.md: storage by access mode, then compute and resilience."""
    lines = [
        "| GPUs | nodes | access | GET/s per node | GET/s total | S3 prefixes at 5,500 GET/s "
        "| request fees $/h | MB/s per node | request CPU cores per node "
        "| CPU cores per node (decode + requests) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['num_gpus']} | {r['num_nodes']} | {r['access']} | {r['get_per_s_per_node']:,.0f} "
            f"| {r['get_per_s_total']:,.0f} | {r['s3_prefixes_needed']} "
            f"| {r['request_usd_per_hour']:,.2f} | {r['MB_per_s_per_node']:,.0f} "
            f"({r['MB_per_s_per_node_360p_source']:,.0f} as downloaded) "
            f"| {r['request_cpu_cores_per_node']:.1f} | {r['cpu_cores_per_node']:.0f} |"
        )
    lines += [
        "",
        "| GPUs | clips/s | epoch | decode CPU cores per GPU: training profile (360p source) "
        "| checkpoint | save | load | gather ms / model ms per step (local batch) "
        "| one preemption: restart, lost wall time, GPU-hours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["access"] != ACCESS[0]:
            continue
        lines.append(
            f"| {r['num_gpus']} | {r['clips_per_s']:,.0f} | {r['epoch_s']:.0f} s "
            f"| {r['decode_cpu_cores_per_gpu']:.1f} ({r['decode_cpu_cores_per_gpu_360p_source']:.1f}) "
            f"| {r['checkpoint_GB']:.2f} GB | {r['checkpoint_save_s']:.1f} s "
            f"| {r['checkpoint_load_s']:.1f} s | {r['gather_ms_per_step']:.2f} / "
            f"{r['model_compute_ms_per_step']:.1f} ({r['local_batch']}) "
            f"= {100 * r['gather_over_model_compute']:.1f}% "
            f"| {r['preemption_restart_s']:.0f} s, {r['preemption_lost_s']:.0f} s, "
            f"{r['preemption_gpu_hours']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--inputs", default=str(DEFAULT_INPUTS), help="inputs file (JSON)")
    parser.add_argument(
        "--decode-json", help="a bench_decode.py result to take decode figures from"
    )
    parser.add_argument("--clips-per-s-per-gpu", type=float, help="replaces the assumed rate")
    parser.add_argument("--block-gets-per-sample", type=float, help="replaces the assumed figure")
    parser.add_argument("--block-bytes-ratio", type=float, help="replaces the assumed figure")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--markdown", help="also write the docs/scale.md tables to this file")
    args = parser.parse_args(argv)
    inputs: dict[str, Any] = json.loads(Path(args.inputs).read_text())
    if args.decode_json:
        decode = json.loads(Path(args.decode_json).read_text())
        inputs = inputs_from_decode_json(inputs, decode, args.decode_json)
    overrides = {
        ("clips_per_s_per_gpu",): args.clips_per_s_per_gpu,
        ("access", "block", "gets_per_sample"): args.block_gets_per_sample,
        ("access", "block", "bytes_per_sample_over_clip"): args.block_bytes_ratio,
    }
    for path, number in overrides.items():
        if number is not None:
            entry = inputs
            for key in path:
                entry = entry[key]
            entry.update(value=number, status="given", source="command line")
    unknown = [n for n in args.gpus if n not in (8, 64, 512)]
    if unknown:
        parser.error(f"--gpus: the gather cost model covers 8, 64 and 512, not {unknown}")
    result = {
        "inputs": inputs,
        "assumed": assumptions(inputs),
        "rows": simulate(inputs, tuple(args.gpus)),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(inputs_markdown(inputs) + "\n" + to_markdown(result["rows"]))
    for row in result["rows"]:
        print(
            f"{row['num_gpus']:4d} GPUs {row['access']:6s} GET/s {row['get_per_s_total']:9.0f} "
            f"prefixes {row['s3_prefixes_needed']:3d} ${row['request_usd_per_hour']:7.2f}/h "
            f"{row['MB_per_s_per_node']:6.0f} MB/s/node "
            f"decode cores/GPU {row['decode_cpu_cores_per_gpu']:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
