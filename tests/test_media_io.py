"""Tests for mmaccel.vision.io: image loading, video sampling, streaming and errors.

Every media file is written at test time (see tests/media_fixtures.py). Each
video frame spells its own index, so every test checks that a frame really is
the one its claimed index names. Claimed metadata alone is never trusted.
"""

from __future__ import annotations

import importlib.util
import inspect
import io as stdio
import itertools
import math
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

# The fixture writers sit next to this file. Put their directory on the path
# so that the import also works under pytest's importlib import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
import media_fixtures as mf  # noqa: E402
from mmaccel.vision import io as mio  # noqa: E402
from mmaccel.vision.io import MediaError  # noqa: E402

BACKENDS = mio.available_backends()
FPS = 30
SHORT_N = 60  # 2 s: PyAV decodes in order
LONG_N = 300  # 10 s: PyAV seeks


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Write every test video once per module, into a temp dir."""
    d = tmp_path_factory.mktemp("media")
    files = {
        "h264_short": mf.write_h264(d / "h264_short.mp4", SHORT_N),
        "h264_long": mf.write_h264(d / "h264_long.mp4", LONG_N, gop=25),
        "h264_long_gop250": mf.write_h264(d / "h264_long_gop250.mp4", LONG_N),
        "mp4v_short": mf.write_mp4v(d / "mp4v_short.mp4", SHORT_N),
        "mp4v_long": mf.write_mp4v(d / "mp4v_long.mp4", LONG_N),
        "faststart": mf.write_h264(d / "faststart.mp4", SHORT_N, faststart=True),
        "corrupt": mf.write_random_bytes(d / "corrupt.mp4"),
        "audio": mf.write_wav(d / "audio.wav"),
    }
    files["empty"] = d / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["truncated"] = mf.truncate_copy(files["h264_short"], d / "truncated.mp4", 0.5)
    files["truncated_faststart"] = mf.truncate_copy(files["faststart"], d / "truncated_fs.mp4", 0.6)
    files["undecodable"] = mf.write_undecodable_mp4(files["faststart"], d / "undecodable.mp4")
    return files


@pytest.fixture(scope="module")
def vp9_webm(tmp_path_factory) -> Path:
    """A 4 s VP9 WebM, long enough for PyAV's seek path. Its header has no frame count."""
    import av

    if "libvpx-vp9" not in av.codecs_available:
        pytest.skip("this FFmpeg build has no VP9 encoder")
    return mf.write_vp9(tmp_path_factory.mktemp("webm") / "clip.webm", 120)


def true_frame_count(name: str) -> int:
    return LONG_N if "long" in name else SHORT_N


def assert_frames_match(clip: mio.VideoClip) -> None:
    """Check that each frame shows the index it is reported as, in RGB order, with timestamps that agree."""
    assert clip.frames.dtype == np.uint8 and clip.frames.ndim == 4 and clip.frames.shape[-1] == 3
    assert len(clip.frames) == len(clip.indices) == len(clip.timestamps)
    assert [mf.decode_index(f) for f in clip.frames] == clip.indices
    assert all(mf.is_rgb_order(f) for f in clip.frames)
    for index, ts in zip(clip.indices, clip.timestamps):
        assert ts == pytest.approx(index / clip.fps, abs=0.5 / clip.fps)


# --------------------------------------------------------------------------- import / backends


def test_import_does_not_load_video_libraries():
    code = (
        "import sys, mmaccel.vision.io, mmaccel.vision; "
        "print(sorted(m for m in ('av', 'cv2', 'decord') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_available_backends_are_ordered_and_real():
    order = ["pyav", "opencv", "decord"]
    assert "pyav" in BACKENDS  # av is a hard dependency of mmaccel
    assert BACKENDS == [b for b in order if b in BACKENDS]
    for name, module in (("opencv", "cv2"), ("decord", "decord")):
        if importlib.util.find_spec(module) is None:
            assert name not in BACKENDS


# --------------------------------------------------------------------------- uniform sampling


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["h264_short", "h264_long", "h264_long_gop250", "mp4v_short", "mp4v_long"])
def test_uniform_sampling_returns_the_claimed_frames(media, name, backend):
    clip = mio.read_video(media[name], num_frames=8, backend=backend)
    total = true_frame_count(name)
    assert clip.backend == backend and clip.path == str(media[name])
    assert clip.total_frames == total and clip.fps == pytest.approx(FPS)
    assert len(clip) == 8 and clip.frames.shape == (8, 48, 64, 3)
    # One frame from each of 8 equal segments: this is uniform coverage.
    for i, index in enumerate(clip.indices):
        assert i * total / 8 <= index < (i + 1) * total / 8
    assert_frames_match(clip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_samples_on_long_clip_mix_seeks_and_forward_decoding(media, backend):
    # 40 samples, 7-8 frames apart with a 25-frame GOP: the PyAV seeker has to
    # both seek and keep decoding forward. Every frame must still be exact.
    clip = mio.read_video(media["h264_long"], num_frames=40, backend=backend)
    assert len(clip) == 40 and len(set(clip.indices)) == 40
    assert_frames_match(clip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vp9_webm_without_frame_count(vp9_webm, backend):
    clip = mio.read_video(vp9_webm, num_frames=8, backend=backend)
    assert abs(clip.total_frames - 120) <= 1  # PyAV estimates duration x rate; stream.frames is 0
    assert len(clip) == 8
    assert_frames_match(clip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_frames_requested_than_exist_gives_each_frame_once(media, backend):
    clip = mio.read_video(media["h264_short"], num_frames=100, max_frames=100, backend=backend)
    assert clip.indices == list(range(SHORT_N))
    assert_frames_match(clip)


def test_backends_agree_with_each_other(media):
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    clips = [mio.read_video(media["mp4v_long"], num_frames=12, backend=b) for b in BACKENDS]
    for clip in clips[1:]:
        assert clip.indices == clips[0].indices
        assert np.abs(clip.frames.astype(int) - clips[0].frames.astype(int)).mean() < 3


# --------------------------------------------------------------------------- fps sampling


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_sampling_count_and_spacing(media, backend):
    clip = mio.read_video(media["h264_long"], fps=2, backend=backend)
    duration = LONG_N / FPS
    assert len(clip) == math.ceil(duration * 2)  # times 0, 0.5, ..., 9.5
    assert np.allclose(np.diff(clip.timestamps), 0.5, atol=0.5 / FPS)
    assert clip.indices[0] == 0
    assert_frames_match(clip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_sampling_capped_by_max_frames_still_covers_whole_video(media, backend):
    clip = mio.read_video(media["h264_long"], fps=10, max_frames=16, backend=backend)
    assert len(clip) == 16
    assert clip.indices[0] < LONG_N / 16 and clip.indices[-1] >= LONG_N * 15 / 16
    assert_frames_match(clip)


def test_fps_above_video_rate_gives_every_frame_once(media):
    clip = mio.read_video(media["h264_short"], fps=100)
    assert clip.indices == list(range(SHORT_N))
    assert_frames_match(clip)


def test_fps_alone_overrides_default_num_frames(media):
    clip = mio.read_video(media["h264_short"], fps=1)  # num_frames keeps its default
    assert len(clip) == SHORT_N // FPS


# --------------------------------------------------------------------------- sampling helpers


def test_uniform_indices_properties():
    for total, num in itertools.product([1, 2, 7, 8, 9, 60, 301, 10_007], [1, 2, 3, 8, 16, 64]):
        picks = mio.uniform_indices(total, num)
        assert len(picks) == min(total, num)
        assert picks == sorted(set(picks))
        assert all(0 <= p < total for p in picks)
        if num < total:  # one pick inside each segment, near its centre
            for i, p in enumerate(picks):
                assert abs(p - (i + 0.5) * total / num) <= 1


def test_fps_indices_match_streaming_selector_and_time_grid():
    for total, vfps, fps in itertools.product([1, 29, 300, 1001], [24.0, 29.97, 30.0, 60.0], [0.5, 1.0, 2.0, 7.3, 30.0, 90.0]):
        picks = mio.fps_indices(total, vfps, fps, max_frames=10**6)
        select = mio._FpsSelector(vfps, fps)
        assert picks == [i for i in range(total) if select(i)]
        assert picks == sorted(set(picks)) and picks[0] == 0
        if fps < vfps:  # each pick is the frame nearest to k / fps
            for k, p in enumerate(picks):
                assert abs(p / vfps - k / fps) <= 0.5 / vfps + 1e-9


# --------------------------------------------------------------------------- iter_frames


class CountingContainer:
    """Wrap a PyAV container and count the packets and frames read through it."""

    def __init__(self, inner, counter):
        self._inner, self._counter = inner, counter

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def demux(self, *args, **kwargs):
        for packet in self._inner.demux(*args, **kwargs):
            self._counter["n"] += 1
            yield packet

    def decode(self, *args, **kwargs):
        for frame in self._inner.decode(*args, **kwargs):
            self._counter["n"] += 1
            yield frame


class CountingCapture:
    """Wrap a cv2.VideoCapture and count grab/read calls."""

    def __init__(self, inner, counter):
        self._inner, self._counter = inner, counter

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def grab(self):
        self._counter["n"] += 1
        return self._inner.grab()

    def read(self):
        self._counter["n"] += 1
        return self._inner.read()


def count_reads(monkeypatch, backend: str) -> dict:
    """Patch the backend library so that every packet/frame read is counted."""
    counter = {"n": 0}
    if backend == "pyav":
        import av

        real = av.open
        monkeypatch.setattr(av, "open", lambda *a, **k: CountingContainer(real(*a, **k), counter))
    elif backend == "opencv":
        import cv2

        real = cv2.VideoCapture
        monkeypatch.setattr(cv2, "VideoCapture", lambda *a: CountingCapture(real(*a), counter))
    else:
        pytest.skip(f"no read counter for {backend}")
    return counter


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_frames_is_lazy(media, monkeypatch, backend):
    counter = count_reads(monkeypatch, backend)
    stream = mio.iter_frames(media["h264_long"], backend=backend)
    assert inspect.isgenerator(stream)
    first = list(itertools.islice(stream, 3))
    stream.close()
    assert [i for i, _, _ in first] == [0, 1, 2]
    assert [mf.decode_index(f) for _, _, f in first] == [0, 1, 2]
    assert counter["n"] < 30, f"read {counter['n']} packets/frames to yield 3 of {LONG_N}"
    # The same counter sees the whole file when everything is consumed, so it really counts.
    counter["n"] = 0
    assert sum(1 for _ in mio.iter_frames(media["h264_long"], backend=backend)) == LONG_N
    assert counter["n"] >= LONG_N


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_frames_yields_every_frame_in_order(media, backend):
    items = list(mio.iter_frames(media["mp4v_short"], backend=backend))
    assert [i for i, _, _ in items] == list(range(SHORT_N))
    assert [mf.decode_index(f) for _, _, f in items] == list(range(SHORT_N))
    assert all(t == pytest.approx(i / FPS, abs=0.5 / FPS) for i, t, _ in items)
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for _, _, f in items)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_frames_fps_matches_read_video(media, backend):
    streamed = list(mio.iter_frames(media["h264_long"], fps=3, backend=backend))
    clip = mio.read_video(media["h264_long"], fps=3, backend=backend)
    assert [i for i, _, _ in streamed] == clip.indices
    assert [mf.decode_index(f) for _, _, f in streamed] == clip.indices


def test_iter_frames_checks_arguments_before_iteration(media, tmp_path):
    with pytest.raises(MediaError, match="not found"):
        mio.iter_frames(tmp_path / "missing.mp4")  # raises without next()
    with pytest.raises(MediaError, match="fps"):
        mio.iter_frames(media["h264_short"], fps=0)
    with pytest.raises(MediaError, match="corrupt"):
        mio.iter_frames(media["corrupt"])


def test_iter_frames_on_undecodable_stream_raises_when_consumed(media):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(MediaError, match="no frames"):
            list(mio.iter_frames(media["undecodable"]))


# --------------------------------------------------------------------------- errors


def single_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and isinstance(excinfo.value, ValueError)
    return text


def test_missing_and_empty_files(media, tmp_path):
    with pytest.raises(MediaError) as exc:
        mio.read_video(tmp_path / "nope.mp4")
    assert "not found" in single_line_error(exc) and "nope.mp4" in str(exc.value)
    with pytest.raises(MediaError) as exc:
        mio.read_video(media["empty"])
    assert "empty (0 bytes)" in single_line_error(exc)
    with pytest.raises(MediaError, match="not a regular file"):
        mio.read_video(tmp_path)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("name", ["corrupt", "truncated"])
def test_corrupt_and_truncated_files(media, name, backend):
    with pytest.raises(MediaError) as exc:
        mio.read_video(media[name], backend=backend)
    text = single_line_error(exc)
    assert str(media[name]) in text and ("corrupt" in text or "truncated" in text)
    if backend == "auto":
        assert all(f"{b}:" in text for b in BACKENDS) if len(BACKENDS) > 1 else BACKENDS[0] in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_faststart_file_keeps_good_prefix(media, backend):
    # The index survives, so the file opens, but the frames near the end are missing.
    with pytest.warns(RuntimeWarning, match="ends early"):
        clip = mio.read_video(media["truncated_faststart"], num_frames=8, backend=backend)
    assert 0 < len(clip) < 8
    assert_frames_match(clip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_with_no_decodable_frames(media, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(MediaError) as exc:
            mio.read_video(media["undecodable"], backend=backend)
    assert "no frames could be decoded" in single_line_error(exc)


def test_audio_only_file_has_no_video_stream(media):
    with pytest.raises(MediaError, match="no video stream"):
        mio.read_video(media["audio"], backend="pyav")


def test_unknown_and_unusable_backends(media):
    with pytest.raises(MediaError) as exc:
        mio.read_video(media["h264_short"], backend="ffmpeg-cli")
    text = single_line_error(exc)
    assert "ffmpeg-cli" in text and all(name in text for name in ("pyav", "opencv", "decord"))
    if "decord" not in BACKENDS:
        with pytest.raises(MediaError, match="not usable here.*pip install decord"):
            mio.read_video(media["h264_short"], backend="decord")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"num_frames": 0}, "num_frames must be in 1..256"),
        ({"num_frames": -3}, "num_frames"),
        ({"num_frames": 300}, "raise max_frames"),
        ({"num_frames": 2.5}, "integer"),
        ({"num_frames": True}, "integer"),
        ({"num_frames": None, "fps": 0}, "fps must be"),
        ({"num_frames": None, "fps": -1.0}, "fps must be"),
        ({"num_frames": None, "fps": float("nan")}, "fps must be"),
        ({"num_frames": None, "fps": float("inf")}, "fps must be"),
        ({"num_frames": None, "fps": "2"}, "fps must be"),
        ({"num_frames": 8, "fps": 2.0}, "exactly one"),
        ({"num_frames": None}, "exactly one"),
        ({"max_frames": 0}, "max_frames"),
    ],
)
def test_bad_sampling_arguments(media, kwargs, fragment):
    with pytest.raises(MediaError, match=fragment):
        mio.read_video(media["h264_short"], **kwargs)


def test_auto_falls_back_when_pyav_cannot_open(media, monkeypatch):
    if "opencv" not in BACKENDS:
        pytest.skip("needs opencv as the fallback")
    import av

    def broken_open(*args, **kwargs):
        raise OSError("simulated PyAV failure")

    monkeypatch.setattr(av, "open", broken_open)
    clip = mio.read_video(media["h264_long"], num_frames=4)
    assert clip.backend == "opencv"
    assert_frames_match(clip)
    with pytest.raises(MediaError, match="simulated PyAV failure"):
        mio.read_video(media["h264_long"], backend="pyav")


def test_video_clip_to_pil(media):
    clip = mio.read_video(media["h264_short"], num_frames=2)
    images = clip.to_pil()
    assert [im.mode for im in images] == ["RGB", "RGB"]
    assert [mf.decode_index(np.asarray(im)) for im in images] == clip.indices


# --------------------------------------------------------------------------- paths


def test_path_kind_by_extension():
    assert mio.is_video_path("a/b/clip.MP4") and mio.is_video_path(Path("x.webm"))
    assert mio.is_video_path("https://host/v.mov?sig=1#t=3")
    assert not mio.is_video_path("photo.jpg") and not mio.is_video_path("noext")
    assert mio.is_image_path("photo.JPEG") and mio.is_image_path(Path("a.png")) and mio.is_image_path("anim.gif")
    assert not mio.is_image_path("clip.mp4") and not mio.is_image_path("archive.tar.gz")


# --------------------------------------------------------------------------- images


@pytest.fixture
def strict_pil(monkeypatch):
    """Make sure that no other code has told PIL to accept truncated files."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_rgb_file_roundtrip(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    img = mio.load_image(save(Image.fromarray(arr), tmp_path / "a.png"))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), arr)


def test_alpha_is_composited_on_white(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque
    arr[0, 1] = (0, 0, 0, 0)  # fully transparent black
    arr[1, 0] = (0, 0, 0, 128)  # half-transparent black
    out = np.asarray(mio.load_image(save(Image.fromarray(arr), tmp_path / "a.png")))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 0])
    la = Image.fromarray(arr[..., [0, 3]])  # mode LA
    assert la.mode == "LA"
    assert tuple(np.asarray(mio.load_image(la))[0, 1]) == (255, 255, 255)


def test_grey_palette_and_cmyk_convert_to_rgb(tmp_path):
    grey = mio.load_image(Image.fromarray(np.full((3, 3), 77, dtype=np.uint8)))
    assert grey.mode == "RGB" and set(np.asarray(grey).ravel().tolist()) == {77}
    pal = Image.new("P", (2, 1))
    pal.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert np.asarray(mio.load_image(pal)).tolist() == [[[200, 10, 10], [10, 200, 10]]]
    pal.info["transparency"] = 1
    assert np.asarray(mio.load_image(save(pal, tmp_path / "p.png", transparency=1))).tolist() == [
        [[200, 10, 10], [255, 255, 255]]
    ]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(mio.load_image(save(cmyk, tmp_path / "c.jpg", quality=100)))
    assert out.shape == (2, 2, 3) and out[..., 0].min() > 230 and out[..., 1:].max() < 25


def test_high_bit_depth_is_scaled_not_clipped(tmp_path):
    arr16 = np.array([[0, 32896, 65535]], dtype=np.uint16)
    out = np.asarray(mio.load_image(save(Image.fromarray(arr16), tmp_path / "g16.png")))
    assert out[0, :, 0].tolist() == [0, 128, 255] and out.shape == (1, 3, 3)
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(mio.load_image(floats))[0, :, 1].tolist() == [0, 128, 255]


def test_numpy_inputs():
    rgb = np.random.default_rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(mio.load_image(rgb)), rgb)
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    assert np.array_equal(np.asarray(mio.load_image(grey))[..., 2], grey)
    rgba = np.dstack([rgb, np.zeros((4, 5), np.uint8)])
    assert (np.asarray(mio.load_image(rgba)) == 255).all()
    for bad, fragment in [
        (rgb.astype(np.float32) / 255, "uint8"),
        (np.zeros((3, 4, 5), np.uint8), "channels last"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((2, 2, 2), np.uint8), "HxW"),
    ]:
        with pytest.raises(MediaError, match=fragment):
            mio.load_image(bad)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    out = mio.load_image(save(img, tmp_path / "rot.jpg", exif=exif))
    assert out.size == (20, 40)


def test_input_image_is_not_modified():
    rgba = Image.new("RGBA", (2, 2), (1, 2, 3, 0))
    out = mio.load_image(rgba)
    assert rgba.mode == "RGBA" and out.mode == "RGB" and out is not rgba


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_images_raise(tmp_path, strict_pil, fmt, ext):
    arr = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = stdio.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    with pytest.raises(MediaError) as exc:
        mio.load_image(path)
    assert "truncated" in single_line_error(exc) and str(path) in str(exc.value)
    with pytest.raises(MediaError, match="truncated"):
        mio.load_image(Image.open(path))  # lazy PIL image: also decoded in full


def test_bad_image_sources(tmp_path, media):
    with pytest.raises(MediaError, match="not found"):
        mio.load_image(tmp_path / "missing.png")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        mio.load_image(tmp_path / "zero.png")
    with pytest.raises(MediaError, match="not a readable image"):
        mio.load_image(mf.write_random_bytes(tmp_path / "noise.png"))
    with pytest.raises(MediaError, match="zero size"):
        mio.load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(MediaError, match="unsupported image source"):
        mio.load_image(12345)
    with pytest.raises(MediaError, match="cannot convert image mode 'La'"):
        mio.load_image(Image.new("La", (2, 2)))  # premultiplied grey+alpha: PIL has no conversion


def test_pyav_seeks_on_long_clips_without_redecoding(media, monkeypatch):
    counter = count_reads(monkeypatch, "pyav")
    clip = mio.read_video(media["h264_long"], num_frames=4, backend="pyav")
    assert_frames_match(clip)
    sparse = counter["n"]
    # The keyframe every 25 frames lets each sample be reached by seeking, so most of the file is never read.
    assert sparse < LONG_N // 2, f"read {sparse} packets for 4 samples of {LONG_N}"
    counter["n"] = 0
    clip = mio.read_video(media["h264_long_gop250"], num_frames=8, backend="pyav")
    assert_frames_match(clip)
    # Seven of the eight samples share the first 250-frame GOP. Seeking back to
    # its keyframe for each sample would read ~950 packets; one forward pass
    # plus one probe packet per sample reads about LONG_N.
    assert counter["n"] <= LONG_N + 2 * 8, f"read {counter['n']} packets; GOP re-decoded?"


# --------------------------------------------------------------------------- decord adapter


class FakeDecordArray:
    def __init__(self, array):
        self._array = array

    def asnumpy(self):
        return self._array


class FakeVideoReader:
    """The part of ``decord.VideoReader``'s API that the adapter uses, with the frames decoded by PyAV.

    decord is not installed here, so the adapter is checked against this stand-in.
    """

    def __init__(self, path, ctx=None):
        import av

        try:
            with av.open(path) as container:
                self._fps = float(container.streams.video[0].average_rate)
                self._frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        except av.FFmpegError as exc:
            raise RuntimeError(f"[DECORDError] cannot open {path}: {exc}") from exc

    def __len__(self):
        return len(self._frames)

    def __getitem__(self, i):
        return FakeDecordArray(self._frames[i])

    def get_avg_fps(self):
        return self._fps

    def get_batch(self, indices):
        return FakeDecordArray(np.stack([self._frames[i] for i in indices]))

    def get_frame_timestamp(self, indices):
        return np.array([[i / self._fps, (i + 1) / self._fps] for i in indices])


@pytest.fixture
def fake_decord(monkeypatch):
    fake = types.ModuleType("decord")
    fake.VideoReader, fake.cpu = FakeVideoReader, lambda i=0: ("cpu", i)
    monkeypatch.setitem(sys.modules, "decord", fake)
    mio.available_backends.cache_clear()
    yield fake
    monkeypatch.undo()
    mio.available_backends.cache_clear()


def test_decord_adapter(media, fake_decord):
    assert mio.available_backends()[-1] == "decord"
    clip = mio.read_video(media["h264_long"], num_frames=6, backend="decord")
    assert clip.backend == "decord" and clip.total_frames == LONG_N and len(clip) == 6
    assert_frames_match(clip)
    streamed = list(mio.iter_frames(media["h264_short"], fps=5, backend="decord"))
    assert [i for i, _, _ in streamed] == mio.fps_indices(SHORT_N, FPS, 5, 256)
    assert [mf.decode_index(f) for _, _, f in streamed] == [i for i, _, _ in streamed]
    with pytest.raises(MediaError, match="decord cannot open"):
        mio.read_video(media["corrupt"], backend="decord")
    assert mio.read_video(media["h264_short"], num_frames=2).backend == "pyav"  # still the preferred one


def test_decoded_video_arrays_must_be_uint8_rgb():
    """Frames handed over as an array: floats were passed on and rescaled by the processor a
    second time (a [0, 1] clip became black); now they are refused with the fix."""
    from mmaccel.pipeline import prepare_media

    frames = np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    assert prepare_media(frames).items[0] is frames
    with pytest.raises(mio.MediaError, match=r"must be uint8, got float32; for floats in \[0, 1\]"):
        prepare_media(frames.astype(np.float32) / 255)
    with pytest.raises(mio.MediaError, match="channels last"):
        prepare_media(frames.transpose(0, 3, 1, 2).copy())
