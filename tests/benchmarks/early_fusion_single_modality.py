"""What early fusion costs at single-modality use: a measured note for docs/models.md.

    .venv/bin/python tests/benchmarks/early_fusion_single_modality.py \\
        --data DATASET --two-stream TS_model.pt --early-fusion EF_model.pt --out ef.json

Both exports come from `avts export` of quickstart-size pretraining runs (two_stream and
early_fusion) on the same synthetic corpus; DATASET must have the labelled pool (`eval_train`,
`eval_test`). Each variant is fine-tuned on every `eval_train` clip with the same recipe
(fixed optimizer steps, AdamW, cosine), for each fine-tuning seed, and scored on `eval_test`
(softmax averaged over evenly spaced windows per clip):

- `scratch/video`: a video net from random weights;
- `two_stream/video`: the two-stream model's video net alone (what AVTS is built for);
- `early_fusion/video_net_alone`: the early-fusion export's `video` weights in a plain video
  net: its later stages run without the audio term they were trained with;
- `early_fusion/silent_audio`: the whole early-fusion net, the audio branch fed the log-mel of
  silence (what a clip without audio gives);
- `early_fusion/with_audio`: the whole early-fusion net with the clip's audio (multimodal).

Writes JSON with each variant's per-seed accuracies, mean and 95% t interval, and seconds.
This is an accuracy measurement: nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from avts_dist.config import DataConfig  # noqa: E402
from avts_dist.data.decode import audio_window, decode_audio, decode_video, logmel  # noqa: E402
from avts_dist.data.index import DatasetIndex, read_member  # noqa: E402
from avts_dist.export import load_exported, model_config_from_export  # noqa: E402
from avts_dist.models import (  # noqa: E402
    FusedClassifier,
    VideoClassifier,
    build_model,
    build_video_net,
    silent_logmel,
)
from avts_dist.stats import t_interval  # noqa: E402


class Clips(torch.utils.data.Dataset):
    """(video window, log-mel of the same window, label, clip position) from the shards."""

    def __init__(self, idx, rows, data: DataConfig, windows: int, train: bool, seed: int):
        self.idx, self.rows, self.data, self.windows = idx, rows, data, windows
        self.train, self.seed, self.fs = train, seed, None

    def __len__(self) -> int:
        return len(self.rows) * self.windows

    def __getitem__(self, i: int):
        if self.fs is None:
            self.fs = self.idx.open_fs()
        pos, j = divmod(i, self.windows)
        row = int(self.rows[pos])
        clip_s = self.data.clip_seconds
        room = max(0.0, float(self.idx.duration[row]) - clip_s - 1e-3)
        rng = np.random.default_rng((self.seed, i))
        start = float(rng.uniform(0, room)) if self.train else room * (j + 0.5) / self.windows
        mp4 = read_member(self.fs, self.idx, row, "mp4")
        d = self.data
        video = decode_video(mp4, start, d.num_frames, d.fps, d.size, self.train, rng)
        wave = audio_window(decode_audio(mp4, d.sample_rate), d.sample_rate, start, clip_s)
        mel = logmel(wave, d.sample_rate, d.num_mel_bins, d.mel_win_ms, d.mel_hop_ms)
        return video, mel, int(self.idx.label[row]), pos


def finetune(model, audio_mode: str, idx, plan, data, args, seed: int) -> tuple[float, float]:
    """Fixed-step fine-tuning on every train clip: (clip accuracy on the test clips, mean
    training loss over the last 10 steps)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    windows_per_clip = -(-args.steps * args.batch_size // len(plan["train"]))
    train = Clips(idx, plan["train"], data, windows_per_clip, train=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train, args.batch_size, shuffle=True, generator=gen)

    def logits(video, mel):
        if audio_mode == "none":
            return model(video)
        return model(video, silent_logmel(mel) if audio_mode == "silence" else mel)

    model.train()
    losses = []
    for step, (video, mel, label, _) in enumerate(loader):
        if step == args.steps:
            break
        loss = F.cross_entropy(logits(video, mel), label)
        losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test = Clips(idx, plan["test"], data, args.test_windows, train=False, seed=seed)
    probs = np.zeros((len(plan["test"]), len(idx.classes)))
    with torch.no_grad():
        for video, mel, _, pos in torch.utils.data.DataLoader(test, args.batch_size):
            np.add.at(probs, pos.numpy(), F.softmax(logits(video, mel), dim=1).numpy())
    acc = float((probs.argmax(1) == idx.label[plan["test"]]).mean())
    return acc, float(np.mean(losses[-10:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--two-stream", required=True, help="export of a two_stream run")
    parser.add_argument("--early-fusion", required=True, help="export of an early_fusion run")
    parser.add_argument("--out", default="bench-results/early_fusion_single_modality.json")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--test-windows", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="a subset of the variants, by name")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    idx = DatasetIndex.load(args.data)
    plan = {"train": idx.rows("eval_train"), "test": idx.rows("eval_test")}
    if not plan["train"].size or not plan["test"].size:
        raise SystemExit(f"{args.data}: needs eval_train and eval_test clips (avts synth)")
    data = DataConfig(url=args.data)
    ts, ef = load_exported(args.two_stream), load_exported(args.early_fusion)
    ts_cfg, ef_cfg = model_config_from_export(ts), model_config_from_export(ef)
    if ef_cfg.arch != "early_fusion" or ts_cfg.arch != "two_stream":
        raise SystemExit("--two-stream / --early-fusion exports have the other architecture")
    num_classes = len(idx.classes)

    def video_net(cfg, weights):
        net = build_video_net(cfg)
        if weights is not None:
            net.load_state_dict(weights, strict=True)
        return VideoClassifier(net, num_classes)

    def fused():
        model = build_model(ef_cfg)
        for part in ("video", "audio", "heads"):
            getattr(model, part).load_state_dict(ef[part], strict=True)
        return FusedClassifier(model, num_classes)

    variants = {
        "scratch/video": (lambda: video_net(ts_cfg, None), "none"),
        "two_stream/video": (lambda: video_net(ts_cfg, ts["video"]), "none"),
        "early_fusion/video_net_alone": (lambda: video_net(ef_cfg, ef["video"]), "none"),
        "early_fusion/silent_audio": (fused, "silence"),
        "early_fusion/with_audio": (fused, "real"),
    }
    report = {
        "data": args.data,
        "label_set": idx.header.get("metadata", {}).get("label_set", "?"),
        "num_train_clips": int(plan["train"].size),
        "num_test_clips": int(plan["test"].size),
        "recipe": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "test_windows")},
        "variants": {},
    }
    for name, (build, audio_mode) in variants.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        accs, losses = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            acc, loss = finetune(build(), audio_mode, idx, plan, data, args, seed)
            accs.append(acc)
            losses.append(loss)
        ci = t_interval(accs)
        report["variants"][name] = {
            "acc": accs,
            "final_train_loss": losses,
            **ci.as_dict(),
            "seconds_per_finetune": (time.perf_counter() - start) / args.seeds,
        }
        seconds = report["variants"][name]["seconds_per_finetune"]
        print(f"{name:32s} {ci}  train loss {np.mean(losses):.3f}  ({seconds:.0f} s each)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
