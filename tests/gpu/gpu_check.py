"""GPU check: the GPU path measured on one GPU, as JSON (``make gpu-check``; one command of at most
8 minutes on an H100/H200; the exact command for a bare GPU machine is in docs/gpu.md).

    python -m tests.gpu.gpu_check --out bench-results/gpu-check.json
    python -m tests.gpu.gpu_check --device cpu --dry-run --out /tmp/dry.json   # every stage at
                                                                               # toy sizes, on CPU

Each stage (tests/gpu/stages.py: decoder, peak, nets, conv3d_agreement, trainer, nvdec) runs in
its own process group under its own timeout; the timeouts are shares of ``--budget-s`` (480 s)
and add up to it. The JSON is rewritten when a stage starts (``running``) and when it ends, so a
check killed from outside still shows how far it got. Each stage ends as

- ``passed`` (with its value);
- ``failed``, with ``reason`` (its own check failed, its exit status, or its timeout) and
  ``error``: the last lines of its output (an import error, a traceback);
- ``skipped``, with ``reason`` (e.g. ``nvdec`` when torchcodec does not load).

Exit status: 0 only when every stage passed; 3, with one line, when there is no GPU (nothing is
measured); 1 otherwise; 2 for bad arguments. Stages run with the repository put first on
``PYTHONPATH``, the caller's entries kept after it (a bare machine's wheels live there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

from tests.gpu.stages import EXIT_SKIPPED, STAGES, pythonpath_env  # noqa: E402

EXIT_NO_GPU = 3
BUDGET_S = 480
# Each stage's share of the budget, in seconds of the 480 (sum: 480).
SHARES = {"decoder": 20, "peak": 20, "nets": 100, "conv3d_agreement": 60, "trainer": 240,
          "nvdec": 40}  # fmt: skip
ERROR_LINES = 20


def _write(path: Path, report: dict) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(lines[-ERROR_LINES:])


def run_one(name: str, cmd: list[str], timeout_s: float, log: Path, result: Path) -> dict:
    """One stage in its own process group; its outcome as the JSON records it."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=pythonpath_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and whatever it started
            proc.wait()
            code = None
    entry: dict = {"elapsed_s": round(time.perf_counter() - t0, 2), "timeout_s": timeout_s}
    data = json.loads(result.read_text()) if result.exists() else {}
    if code is None:
        entry.update(status="failed", reason=f"timed out after {timeout_s:.0f} s",
                     error=_tail(log))  # fmt: skip
    elif code == EXIT_SKIPPED and "skipped" in data:
        entry.update(status="skipped", reason=data["skipped"])
    elif code == 0:
        entry.update(status="passed", value=data.get("value"))
    else:
        reason = "its check failed" if "value" in data else f"exit status {code}"
        lines = _tail(log).splitlines()
        entry.update(status="failed", reason=f"{reason}: {lines[-1] if lines else ''}"[:300],
                     error="\n".join(lines), value=data.get("value"))  # fmt: skip
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes, one repeat: runs every code path (CPU allowed); "
                             "its figures are not measurements")  # fmt: skip
    parser.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET_S,
        help=f"the stages' timeouts add up to this (default {BUDGET_S})",
    )
    parser.add_argument("--only", default="", help="comma-separated stages to run (default all)")
    parser.add_argument(
        "--stage-command",
        action="append",
        default=[],
        metavar="NAME=CODE",
        help="run python -c CODE as stage NAME (tests of the check itself)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: skipped: no GPU (CUDA is not available here); nothing was measured",
              file=sys.stderr)  # fmt: skip
        return EXIT_NO_GPU
    if args.device == "cpu" and not args.dry_run:
        print("gpu-check: --device cpu needs --dry-run (a CPU measures nothing of the GPU path)",
              file=sys.stderr)  # fmt: skip
        return 2
    only = [s for s in args.only.split(",") if s] or list(STAGES)
    replaced = dict(item.split("=", 1) for item in args.stage_command)
    unknown = sorted(set(only) - set(STAGES)) + sorted(set(replaced) - set(STAGES))
    if unknown:
        print(f"gpu-check: unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scale = args.budget_s / sum(SHARES.values())
    report: dict = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "budget_s": args.budget_s, "video_decoder": None, "stages": {},
    }  # fmt: skip
    t_start = time.perf_counter()
    common = ["--device", args.device] + (["--dry-run"] if args.dry_run else [])
    with tempfile.TemporaryDirectory(prefix="avts-gpu-check-") as tmp:
        for name in (s for s in STAGES if s in only):
            timeout_s = round(SHARES[name] * scale, 1)
            report["stages"][name] = {"status": "running", "timeout_s": timeout_s}
            _write(out, report)
            print(f"gpu-check: {name} (timeout {timeout_s:.0f} s)", flush=True)
            result, log = Path(tmp, f"{name}.json"), Path(tmp, f"{name}.log")
            extra = ["--decoder", (report["video_decoder"] or {}).get("video_decoder", "pyav")]
            peak = report["stages"].get("peak", {}).get("value")
            if peak:
                extra += ["--peak", str(peak)]
            cmd = (
                [sys.executable, "-c", replaced[name]] if name in replaced else
                [sys.executable, "-m", "tests.gpu.stages", name, "--result", str(result),
                 *common, *extra]
            )  # fmt: skip
            entry = run_one(name, cmd, timeout_s, log, result)
            report["stages"][name] = entry
            if name == "decoder" and entry["status"] == "passed":
                report["video_decoder"] = entry["value"]
            report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            _write(out, report)
            line = f"gpu-check: {name} {entry['status']} in {entry['elapsed_s']:.0f} s"
            print(line + (f": {entry['reason']}" if "reason" in entry else ""), flush=True)
            if entry["status"] == "failed" and entry.get("error"):
                print(entry["error"], flush=True)
    not_passed = [n for n, e in report["stages"].items() if e["status"] != "passed"]
    report["passed"] = not not_passed
    _write(out, report)
    print(f"gpu-check: wrote {out} in {report['elapsed_s']:.0f} s; "
          + ("every stage passed" if not not_passed else
             "NOT PASSED: " + ", ".join(f"{n} {report['stages'][n]['status']}"
                                        for n in not_passed)))  # fmt: skip
    return 0 if not not_passed else 1


if __name__ == "__main__":
    sys.exit(main())
