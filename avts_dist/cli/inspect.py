"""avts inspect: summarize a sharded dataset (clips, hours, shards, classes, audio, broken clips,
and the encoding profile `avts prepare` recorded).

avts inspect data/synth
avts inspect s3://bucket/ds --json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from avts_dist.cli import add_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("url", help="dataset URL: local path, file://, s3://, memory://")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also check that every shard exists and is as long as the index says (exit 1 if not)",
    )
    add_storage_options(parser)


def summarize(idx) -> dict[str, Any]:
    """The numbers ``avts inspect`` prints, as a plain dict."""
    num_clips = len(idx)
    status = idx.status
    broken = Counter(str(s) for s in status if s != "ok")
    splits: dict[str, dict[str, int]] = {}
    for name in idx.splits:
        rows = idx.split_code == idx.splits.index(name)
        splits[name] = {"clips": int(rows.sum()), "ok": int((rows & (status == "ok")).sum())}
    return {
        "url": idx.url,
        "format_version": idx.header["format_version"],
        "clips": num_clips,
        "hours": round(float(idx.duration.astype("float64").sum()) / 3600.0, 4),
        "shards": len(idx.shards),
        "classes": len(idx.classes),
        "class_names": idx.classes,
        "audio_share": round(float(idx.has_audio.mean()) if num_clips else 0.0, 4),
        "video_share": round(float(idx.has_video.mean()) if num_clips else 0.0, 4),
        "ok_clips": num_clips - sum(broken.values()),
        "broken_clips": sum(broken.values()),
        "broken_by_reason": dict(sorted(broken.items())),
        "splits": splits,
        "members": idx.members,
        "profile": idx.profile,
    }


def describe_profile(profile: dict[str, Any] | None) -> str:
    """One line for the encoding profile recorded in the index header."""
    if not profile:
        return "not recorded"
    if profile.get("name") != "training":
        details = ", ".join(f"{k} {v}" for k, v in profile.items() if k != "name")
        return f"{profile.get('name')}" + (f" ({details})" if details else "")
    fps = (
        f"{profile['fps']:g} fps"
        if profile["fps"]
        else f"source fps, at most {profile['max_fps']:g}"
    )
    return (
        f"training: {profile['video_codec'].upper()} {profile['pix_fmt']}, short side "
        f"{profile['short_side']} (never upscaled), {fps}, a keyframe every "
        f"{profile['keyframe_interval_s']:g} s, {profile['audio_codec'].upper()} mono "
        f"{profile['sample_rate']} Hz" + (", faststart" if profile.get("faststart") else "")
    )


def run(args: argparse.Namespace) -> int:
    from avts_dist.data.index import DatasetIndex

    idx = DatasetIndex.load(args.url, args.storage_options)
    summary = summarize(idx)
    if args.verify:
        summary["problems"] = idx.verify()
    status = 1 if summary.get("problems") else 0
    if args.json:
        print(json.dumps(summary, indent=2))
        return status
    reasons = ", ".join(f"{k} {v}" for k, v in summary["broken_by_reason"].items()) or "none"
    split_text = ", ".join(f"{k} {v['clips']} ({v['ok']} ok)" for k, v in summary["splits"].items())
    names = ", ".join(summary["class_names"][:8]) + (" ..." if summary["classes"] > 8 else "")
    lines = [
        f"dataset   {summary['url']} (format v{summary['format_version']})",
        f"clips     {summary['clips']}",
        f"hours     {summary['hours']:.3f}",
        f"shards    {summary['shards']}",
        f"classes   {summary['classes']}" + (f" ({names})" if names else ""),
        f"audio     {100 * summary['audio_share']:.1f}% of clips have an audio track",
        f"broken    {summary['broken_clips']} ({reasons})",
        f"splits    {split_text}",
        f"profile   {describe_profile(summary['profile'])}",
    ]
    if args.verify:
        problems = summary["problems"]
        lines.append(f"verify    {'ok' if not problems else '; '.join(problems)}")
    print("\n".join(lines))
    return status
