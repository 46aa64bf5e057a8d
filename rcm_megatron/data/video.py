"""Video decoding, frame sampling and resizing for ``tools/prepare_data.py`` (and the first-frame
images of ``tools/synthesize_data.py --task i2v``, read with Pillow as one-frame clips).

Decoders: DALI on GPU when ``nvidia.dali`` is installed (NGC containers ship it), PyAV
otherwise; torchcodec when asked for. Each returns uint8 frames [T, H, W, 3] at the
sampled source indices. Clips start at the first frame; with ``target_fps`` the source is
resampled by timestamps (frame i at source frame round(i * src_fps / target_fps)), which is
how Wan's 16 fps training clips are cut from 24/30 fps footage.

Resizing (scale to cover the target, then center-crop, antialiased bilinear) is done in
torch on whatever device the frames are on: no library offers resize + center-crop on
video tensors without torchvision, which the project does not depend on.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "pyav", "dali", "torchcodec")


class VideoError(ValueError):
    """A video that cannot be used (unreadable, too short); the message names the file."""


class TooFewFrames(VideoError):
    pass


def check_frame_count(num_frames: int, temporal_factor: int = 4) -> None:
    """Wan's causal VAE encodes the first frame alone and then groups of ``temporal_factor``:
    it needs k * temporal_factor + 1 frames."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        lo = (num_frames - 1) // temporal_factor * temporal_factor + 1
        raise ValueError(f"--num-frames {num_frames}: the Wan VAE needs {temporal_factor}k+1 frames "
                         f"(e.g. {max(1, lo)} or {lo + temporal_factor})")


def sample_indices(num_frames: int, source_fps: float | None, target_fps: float | None) -> list[int]:
    """Source frame indices of a clip of ``num_frames`` starting at frame 0."""
    step = 1.0
    if target_fps and source_fps and source_fps > 0:
        step = float(source_fps) / float(target_fps)
    return [int(math.floor(i * step + 0.5)) for i in range(num_frames)]


def _pick(frames_needed: list[int], available: int, path: str, source_fps, target_fps) -> None:
    if available <= frames_needed[-1]:
        rate = f" at {target_fps:g} fps (source {source_fps:g} fps)" if target_fps and source_fps else ""
        raise TooFewFrames(f"{path}: {available} frames, a clip of {len(frames_needed)} frames{rate} "
                           f"needs {frames_needed[-1] + 1}")


# ----------------------------------------------------------------------------- decoders
def _read_pyav(path: str, num_frames: int, target_fps: float | None) -> torch.Tensor:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            src_fps = float(rate) if rate else None
            want = sample_indices(num_frames, src_fps, target_fps)
            want_set, wanted, decoded = set(want), {}, 0
            for frame in container.decode(stream):
                i, decoded = decoded, decoded + 1
                if i in want_set:
                    wanted[i] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                if i >= want[-1]:
                    break
            available = decoded
    except VideoError:
        raise
    except Exception as e:  # av.error.*, corrupt containers
        raise VideoError(f"{path}: cannot decode: {type(e).__name__}: {e}") from e
    _pick(want, available, path, src_fps, target_fps)
    return torch.stack([wanted[i] for i in want])


def _source_fps(path: str) -> float | None:
    try:
        import av

        with av.open(path) as c:
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate
            return float(rate) if rate else None
    except Exception:
        return None


def _read_torchcodec(path: str, num_frames: int, target_fps: float | None, device: str) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    try:
        dec = VideoDecoder(path, device=device)
        md = dec.metadata
        want = sample_indices(num_frames, md.average_fps, target_fps)
        _pick(want, int(md.num_frames or len(dec)), path, md.average_fps, target_fps)
        frames = dec.get_frames_at(indices=want).data  # [T, 3, H, W] uint8
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"{path}: cannot decode: {type(e).__name__}: {e}") from e
    return frames.permute(0, 2, 3, 1).contiguous()


_DALI_PIPES: dict = {}


def _read_dali(path: str, num_frames: int, target_fps: float | None, device: str) -> torch.Tensor:
    """DALI's video decoder on the file's bytes ("mixed" = GPU decode when ``device`` is cuda).
    DALI gives no frame rate, so it is read from the container header with PyAV."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.startswith("cuda")
    dev_id = torch.device(device).index or 0 if gpu else None
    key = (gpu, dev_id)
    if key not in _DALI_PIPES:
        @pipeline_def(batch_size=1, num_threads=2, device_id=dev_id if gpu else None, prefetch_queue_depth=1)
        def pipe():
            data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, device="cpu")
            decode = getattr(getattr(fn, "decoders", None), "video", None) or fn.experimental.decoders.video
            return decode(data, device="mixed" if gpu else "cpu")

        p = pipe()
        p.build()
        _DALI_PIPES[key] = p
    p = _DALI_PIPES[key]
    try:
        with open(path, "rb") as f:
            p.feed_input("encoded", [np.frombuffer(f.read(), dtype=np.uint8)])
        (out,) = p.run()
        if gpu:
            out = out.as_cpu()
        frames = torch.from_numpy(np.array(out.as_array()[0]))  # [T, H, W, 3]
    except Exception as e:
        raise VideoError(f"{path}: cannot decode with DALI: {type(e).__name__}: {e}") from e
    src_fps = _source_fps(path)
    want = sample_indices(num_frames, src_fps, target_fps)
    _pick(want, frames.shape[0], path, src_fps, target_fps)
    return frames[want]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except ImportError:
        return False


def pick_backend(backend: str, device: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"--decoder {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        return "dali" if device.startswith("cuda") and dali_available() else "pyav"
    return backend


def read_video(path: str, num_frames: int, target_fps: float | None = None, backend: str = "pyav",
               device: str = "cpu") -> torch.Tensor:
    """uint8 frames [num_frames, H, W, 3]; VideoError (naming ``path``) if it cannot be used."""
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    if backend == "dali":
        try:
            return _read_dali(path, num_frames, target_fps, device)
        except TooFewFrames:
            raise
        except VideoError as dali_error:  # a codec DALI's decoder lacks: PyAV decodes everything FFmpeg does
            try:
                return _read_pyav(path, num_frames, target_fps)
            except TooFewFrames:
                raise
            except VideoError as e:
                raise VideoError(f"{e} (DALI: {dali_error})") from e
    if backend == "torchcodec":
        return _read_torchcodec(path, num_frames, target_fps, device)
    return _read_pyav(path, num_frames, target_fps)


def read_image(path: str) -> torch.Tensor:
    """uint8 [1, H, W, 3] (RGB) of an image file, as ``read_video`` gives frames; VideoError (naming
    ``path``) if it is missing or Pillow cannot decode it."""
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VideoError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return torch.from_numpy(rgb.copy()).unsqueeze(0)


# ----------------------------------------------------------------------------- resize
def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, height, width] in [-1, 1] (the Wan VAE's input range):
    scale so the frame covers the target (aspect kept), antialiased bilinear, center crop."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
