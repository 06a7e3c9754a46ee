"""Vision helpers: loading images and sampling frames from videos."""

from mmaccel.vision.io import (
    MediaError,
    VideoClip,
    available_backends,
    is_image_path,
    is_video_path,
    iter_frames,
    load_image,
    read_video,
)

__all__ = [
    "MediaError",
    "VideoClip",
    "available_backends",
    "is_image_path",
    "is_video_path",
    "iter_frames",
    "load_image",
    "read_video",
]
