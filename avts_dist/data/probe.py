"""Probe one media file (bytes) with PyAV: stream parameters and a health status for the index."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import av

__all__ = ["MediaInfo", "probe_media"]


@dataclass
class MediaInfo:
    duration: float = 0.0
    fps: float = 0.0
    num_frames: int = 0
    has_video: bool = False
    has_audio: bool = False
    sample_rate: int = 0
    # "ok" or the reason the clip cannot be trained on: unreadable | no_video | no_audio | too_short
    status: str = "unreadable"

    def as_dict(self) -> dict:
        return asdict(self)


def probe_media(
    data: bytes, *, need_video: bool = True, need_audio: bool = True, min_duration: float = 0.0
) -> MediaInfo:
    """Reads the container header and demuxes every packet (no decoding), so a file cut short
    or with a corrupt payload is caught here rather than in a training worker."""
    info = MediaInfo()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            video = container.streams.video[0] if container.streams.video else None
            audio = container.streams.audio[0] if container.streams.audio else None
            info.has_video = video is not None
            info.has_audio = audio is not None
            if video is not None:
                info.fps = float(video.average_rate or video.guessed_rate or 0.0)
                info.num_frames = int(video.frames or 0)
            if audio is not None:
                info.sample_rate = int(audio.codec_context.sample_rate or audio.rate or 0)
            if container.duration is not None:
                info.duration = container.duration / av.time_base
            num_video_packets = 0
            last_end = 0.0
            for packet in container.demux():
                if packet.size == 0 or packet.pts is None:
                    continue
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                last_end = max(last_end, end)
                if video is not None and packet.stream.index == video.index:
                    num_video_packets += 1
    except (av.error.FFmpegError, ValueError, IndexError, OSError):
        info.status = "unreadable"
        return info
    if info.num_frames == 0:
        info.num_frames = num_video_packets
    if info.has_video and num_video_packets < info.num_frames:
        # The header promises frames that are not in the file: a truncated download.
        info.status = "truncated"
        return info
    if info.duration <= 0.0:
        info.duration = last_end
    if need_video and not info.has_video:
        info.status = "no_video"
    elif need_audio and not info.has_audio:
        info.status = "no_audio"
    elif info.duration < min_duration:
        info.status = "too_short"
    else:
        info.status = "ok"
    return info
