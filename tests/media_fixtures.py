"""Write small media files for the media IO tests at test time. No binary fixtures are stored in the repo.

Every video frame spells its own index in binary as a 4x3 grid of dark and
light 16x16 blocks. That survives lossy codecs far better than an index
coded as a colour level: mp4v's chroma quantisation moves flat colours by
4-5 levels, while the gap between dark and light is 192. The blue channel
is tinted, so a swapped RGB/BGR order is caught too.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

BLOCK = 16  # side of one bit block, in pixels; matches the codecs' 16x16 macroblocks
COLS, ROWS = 4, 3  # a 64x48 frame holds 12 bits, so indices up to 4095
DARK, LIGHT = 32, 224  # kept clear of 0/255 so the YUV range conversion never clips


def make_frame(i: int, width: int = 64, height: int = 48) -> np.ndarray:
    """Return frame ``i`` as an HxWx3 uint8 RGB array whose grid of blocks spells ``i`` in binary."""
    frame = np.full((height, width, 3), DARK, dtype=np.uint8)
    for bit in range(COLS * ROWS):
        if (i >> bit) & 1:
            r, c = divmod(bit, COLS)
            frame[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] = LIGHT
    frame[..., 2] = frame[..., 2] // 2 + 64  # tint blue so an RGB/BGR swap is detectable
    return frame


def decode_index(frame: np.ndarray) -> int:
    """Read the index back from a decoded RGB frame, using the centre of each block to avoid edge ringing."""
    value = 0
    for bit in range(COLS * ROWS):
        r, c = divmod(bit, COLS)
        y, x = r * BLOCK + BLOCK // 4, c * BLOCK + BLOCK // 4
        if frame[y : y + BLOCK // 2, x : x + BLOCK // 2, 0].mean() > (DARK + LIGHT) / 2:
            value |= 1 << bit
    return value


def is_rgb_order(frame: np.ndarray) -> bool:
    """Say whether the channels are in RGB order. On dark blocks blue (80) is brighter than red (32); a BGR swap reverses that."""
    dark = frame[..., 0] < (DARK + LIGHT) / 2
    return bool(frame[..., 2][dark].mean() > frame[..., 0][dark].mean() + 20)


def write_pyav(
    path: Path, n: int, fps: int, codec: str = "libx264", size=(64, 48), options=None, faststart: bool = False
) -> Path:
    """Encode ``n`` index-coded frames with PyAV. The container format follows from the file extension.

    ``faststart`` puts the mp4 index (moov) before the media data, so a file truncated later still opens.
    """
    import av

    width, height = size
    container_options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=container_options) as out:
        stream = out.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(make_frame(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_h264(path: Path, n: int, fps: int = 30, gop: int | None = None, **kw) -> Path:
    """Write an H.264 mp4 with libx264. ``gop`` sets the keyframe interval (x264's default is 250)."""
    options = {"preset": "ultrafast", "crf": "18"}
    if gop is not None:
        options.update({"g": str(gop), "keyint_min": str(gop)})
    return write_pyav(path, n, fps, "libx264", options=options, **kw)


def write_vp9(path: Path, n: int, fps: int = 30) -> Path:
    """Write a VP9 WebM. Its header stores no frame count, so PyAV reports ``stream.frames == 0``."""
    options = {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0"}
    return write_pyav(path, n, fps, "libvpx-vp9", options=options)


def write_mp4v(path: Path, n: int, fps: int = 30, size=(64, 48)) -> Path:
    """Write an MPEG-4 Part 2 mp4 with cv2.VideoWriter (the opencv wheel has no H.264 encoder)."""
    import cv2

    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError("cv2.VideoWriter cannot write mp4v here")
    for i in range(n):
        writer.write(make_frame(i, width, height)[:, :, ::-1].copy())  # RGB -> BGR
    writer.release()
    return path


def write_undecodable_mp4(src_faststart: Path, dst: Path) -> Path:
    """Copy a faststart mp4 and zero its media data. The index is intact, so the file opens and claims frames, but none decode.

    An mp4 or mkv with an empty video track cannot be written at all
    (FFmpeg drops the track or writes a file that does not open), so this
    is how to get "a video with zero decodable frames".
    """
    data = bytearray(src_faststart.read_bytes())
    moov, mdat = data.find(b"moov"), data.find(b"mdat")
    assert 0 <= moov < mdat, "source must be written with faststart=True"
    data[mdat + 4 :] = bytes(len(data) - mdat - 4)
    dst.write_bytes(bytes(data))
    return dst


def write_wav(path: Path, seconds: float = 0.5, rate: int = 8000) -> Path:
    """Write a silent mono WAV file: a valid media file with no video stream."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(seconds * rate))
    return path


def write_random_bytes(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """Write random bytes, e.g. under a .mp4 name."""
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def truncate_copy(src: Path, dst: Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src`` to ``dst``, as an interrupted download would leave it."""
    data = src.read_bytes()
    dst.write_bytes(data[: max(1, int(len(data) * fraction))])
    return dst
