"""Upscaling a video file through PyAV (FFmpeg): frames streamed, audio copied.

`upscale_video(run, src, dst, scale)` decodes the first video stream of `src` frame by
frame, upscales `batch` frames at a time with `run` ((N, 3, H, W) float 0..255 ->
(N, 3, sH, sW)), and encodes them into `dst` with the same frame count, timestamps and rate
(H.264 for .mp4/.mkv/.mov/.avi, VP9 for .webm; yuv420p, CRF `crf`); every audio stream is
copied packet by packet, not re-encoded. At most one batch of frames (in and out) is held
in memory. The file appears at `dst` only when complete (`fastsr.atomic.atomic_write`).
Several processes can share one video: each writes a part (`upscale_video(part=(i, n))`),
and `join_video_parts` appends them and copies the audio.

PyAV is an optional dependency (`pip install 'fastsr[video]'`); without it the functions
here raise FastSRError saying so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastsr.atomic import atomic_write
from fastsr.errors import FastSRError

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi")
# FFmpeg muxer and video encoder per output suffix.
_MUXERS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm", ".avi": "avi"}
_ENCODERS = {".webm": "libvpx-vp9"}
_DEFAULT_ENCODER = "libx264"


def _av(path: str | os.PathLike):
    try:
        import av
    except ImportError:
        raise FastSRError(f"{path}: reading and writing video needs PyAV: pip install 'fastsr[video]' "
                          "(or pip install av)") from None
    return av


@dataclass
class VideoInfo:
    """The first video stream of a file: size, frame rate, frame count (0: not in the header)."""

    width: int
    height: int
    rate: float
    frames: int
    audio_streams: int


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video file's header; FastSRError (one line, naming the file) when it is not one."""
    av = _av(path)
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise FastSRError(f"{path}: no video stream")
            v = c.streams.video[0]
            return VideoInfo(v.codec_context.width, v.codec_context.height, float(v.average_rate or 0),
                             int(v.frames or 0), len(c.streams.audio))
    except av.FFmpegError as e:
        raise FastSRError(f"{path}: not a video file PyAV/FFmpeg reads ({e.strerror or e})") from None


def count_frames(path: str | os.PathLike) -> int:
    """Frames in the first video stream: the header's count, else its packets counted (no decoding)."""
    av = _av(path)
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return int(v.frames) if v.frames else sum(1 for p in c.demux(v) if p.size)


def upscale_video(run: Callable[[torch.Tensor], torch.Tensor], src: str | os.PathLike, dst: str | os.PathLike,
                  scale: int, *, batch: int = 4, crf: int = 18, on_frames: Callable[[int], None] | None = None,
                  part: tuple[int, int] | None = None) -> int:
    """Upscale every frame of src's first video stream into dst (audio copied); returns the
    number of frames written. on_frames(n) after each batch of n frames (progress).

    run: (N, 3, H, W) float32 0..255 on the CPU -> (N, 3, scale*H, scale*W), any float
    dtype and device (clamped and rounded here). part (i, n): only the i-th of n near-equal
    runs of frames, video only and without B-frames (so that parts follow each other), for
    `join_video_parts`; a part with no frames writes nothing and returns 0. FastSRError for
    unreadable input or an unknown output suffix; the output appears only when complete.
    """
    av = _av(src)
    src, dst = Path(src), Path(dst)
    suffix = dst.suffix.lower()
    if suffix not in _MUXERS:
        raise FastSRError(f"{dst}: a video is written as {', '.join(VIDEO_EXTENSIONS)}, not {suffix or 'no suffix'}")
    first, stop = 0, None
    if part is not None:
        total = count_frames(src)
        first, stop = (round(k * total / part[1]) for k in (part[0], part[0] + 1))
        if first >= stop:
            return 0
    written = 0

    def write(tmp: str) -> None:
        with av.open(str(src)) as inp, av.open(tmp, "w", format=_MUXERS[suffix]) as out:
            if not inp.streams.video:
                raise FastSRError(f"{src}: no video stream")
            vin = inp.streams.video[0]
            vout = out.add_stream(_ENCODERS.get(suffix, _DEFAULT_ENCODER), rate=vin.average_rate)
            vout.width, vout.height = vin.codec_context.width * scale, vin.codec_context.height * scale
            vout.pix_fmt = "yuv420p"
            vout.time_base = vin.time_base
            vout.options = {"crf": str(crf)}
            if part is not None:
                vout.codec_context.max_b_frames = 0  # decode order = display order: parts join by appending
            audio = {a: out.add_stream_from_template(a) for a in inp.streams.audio} if part is None else {}
            pending: list = []

            def flush() -> None:
                nonlocal written
                if not pending:
                    return
                lr = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in pending])).permute(0, 3, 1, 2)
                sr = run(lr.float()).float().clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                for frame, pixels in zip(pending, sr):
                    new = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
                    new.pts, new.time_base = frame.pts, frame.time_base
                    for packet in vout.encode(new):
                        out.mux(packet)
                written += len(pending)
                if on_frames is not None:
                    on_frames(len(pending))
                pending.clear()

            index = 0
            for packet in inp.demux(vin, *audio):
                if packet.stream is not vin:
                    if packet.dts is not None:  # the demuxer's flush packets carry nothing
                        packet.stream = audio[packet.stream]
                        out.mux(packet)
                    continue
                for frame in packet.decode():
                    if first <= index and (stop is None or index < stop):
                        pending.append(frame)
                    index += 1
                    if len(pending) >= batch:
                        flush()
                if stop is not None and index >= stop:
                    break
            flush()
            for packet in vout.encode():
                out.mux(packet)

    try:
        atomic_write(dst, write)
    except av.FFmpegError as e:
        raise FastSRError(f"{src}: cannot transcode ({e.strerror or e})") from None
    return written


def join_video_parts(parts: list[Path], src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """One video from the `upscale_video(..., part=(i, n))` files in order (those that exist:
    a part without frames writes none), with src's audio streams copied; written atomically.
    The parts' packets are copied, not re-encoded."""
    av = _av(src)
    dst = Path(dst)
    parts = [p for p in parts if Path(p).exists()]

    def write(tmp: str) -> None:
        with av.open(str(src)) as inp, av.open(tmp, "w", format=_MUXERS[dst.suffix.lower()]) as out:
            opened = [av.open(str(p)) for p in parts]
            try:
                vout = out.add_stream_from_template(opened[0].streams.video[0])
                audio = {a: out.add_stream_from_template(a) for a in inp.streams.audio}
                for c in opened:
                    for packet in c.demux(c.streams.video[0]):
                        if packet.dts is not None:
                            packet.stream = vout
                            out.mux(packet)
                for packet in (inp.demux(*audio) if audio else ()):
                    if packet.dts is not None:
                        packet.stream = audio[packet.stream]
                        out.mux(packet)
            finally:
                for c in opened:
                    c.close()

    try:
        atomic_write(dst, write)
    except av.FFmpegError as e:
        raise FastSRError(f"{src}: cannot join the upscaled parts ({e.strerror or e})") from None


__all__ = ["VIDEO_EXTENSIONS", "VideoInfo", "count_frames", "join_video_parts", "probe", "upscale_video"]
