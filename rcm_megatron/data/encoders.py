"""The Wan2.1 VAE, umT5 text encoder and CLIP image encoder, as the data tools use them (diffusers /
transformers).

All load with ``from_pretrained`` from a local folder (nothing is downloaded): either the
component folder itself or a Wan diffusers pipeline folder (its ``vae/``,
``text_encoder/``, ``tokenizer/``, ``image_encoder/`` and ``image_processor/`` are used).

Latents are normalized as Wan's DiT consumes them: z = (mu - latents_mean) / latents_std
per channel, mu the posterior mean (deterministic; ``sample=True`` draws from it).
Prompts follow Wan's text path: whitespace cleaned, tokenized to at most ``max_length``
(512) tokens with the end token, encoded with the attention mask; the embedding is cut to
the prompt's own tokens (the loader zero-pads to ``max_length`` again, as Wan does).
"""

from __future__ import annotations

import os

import torch

# Wan2.1's default negative prompt (its sample_neg_prompt), used for CFG during distillation.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def _component(path: str, sub: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    nested = os.path.join(path, sub)
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(nested):
        return nested
    return path


def clean_prompt(text: str) -> str:
    return " ".join(str(text).split())


class WanVAEEncoder:
    """diffusers ``AutoencoderKLWan``: video [B,3,T,H,W] in [-1,1] -> normalized latents."""

    def __init__(self, path: str, device="cpu", dtype=torch.float32):
        from diffusers import AutoencoderKLWan

        folder = _component(path, "vae")
        self.vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
        self.vae.requires_grad_(False)
        cfg = self.vae.config
        self.source = os.path.abspath(folder)
        self.device, self.dtype = torch.device(device), dtype
        down = list(cfg.temperal_downsample)
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(down))
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", None) or 2 ** len(down))
        self.z_dim = int(cfg.z_dim)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        if height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(f"--height/--width {height}x{width} must be multiples of the VAE's spatial factor "
                             f"{self.spatial_factor}")
        return (self.z_dim, (num_frames - 1) // self.temporal_factor + 1, height // self.spatial_factor,
                width // self.spatial_factor)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        dist = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        z = z.float()
        return (z - self.mean.to(z.device)) / self.std.to(z.device)


class UMT5TextEncoder:
    """transformers ``UMT5EncoderModel`` + tokenizer -> per-prompt embeddings [L_i, D]."""

    def __init__(self, path: str, tokenizer: str | None = None, device="cpu", dtype=torch.float32,
                 max_length: int = 512):
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = _component(path, "text_encoder")
        tok_folder = tokenizer or (os.path.join(path, "tokenizer") if os.path.isdir(os.path.join(path, "tokenizer"))
                                   else folder)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_folder)
        self.model = UMT5EncoderModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.source = os.path.abspath(folder)
        self.device, self.max_length = torch.device(device), int(max_length)
        self.dim = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        tok = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.max_length,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        h = self.model(ids, attention_mask=mask).last_hidden_state.float().cpu()
        lengths = mask.sum(1).tolist()
        return [h[i, : max(1, int(n))].clone() for i, n in enumerate(lengths)]


class CLIPImageEncoder:
    """transformers ``CLIPVisionModel`` + ``CLIPImageProcessor`` -> image embeddings [L_img, D], the
    penultimate hidden states as diffusers' ``WanImageToVideoPipeline.encode_image`` takes them."""

    def __init__(self, path: str, device="cpu", dtype=torch.float32):
        from transformers import CLIPImageProcessor, CLIPVisionModel

        folder = _component(path, "image_encoder")
        proc = os.path.join(os.path.dirname(folder.rstrip("/")), "image_processor")
        proc = folder if os.path.isfile(os.path.join(folder, "preprocessor_config.json")) or not os.path.isdir(proc) \
            else proc
        if not os.path.isfile(os.path.join(proc, "preprocessor_config.json")):
            raise FileNotFoundError(f"--image-encoder {path}: no preprocessor_config.json (CLIPImageProcessor) in "
                                    f"{folder} or beside it in image_processor/")
        self.processor = CLIPImageProcessor.from_pretrained(proc)
        self.model = CLIPVisionModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.source = os.path.abspath(folder)
        self.device, self.dtype = torch.device(device), dtype
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> [B, L_img, D] (float32, CPU). The processor gets 8-bit RGB
        arrays, as diffusers' pipeline gives it a PIL image (the frames come from 8-bit video)."""
        arrays = [((im.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
                  for im in images]
        pixels = self.processor(images=arrays, return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float().cpu()


@torch.no_grad()
def image_conditions(vae: WanVAEEncoder, clip: torch.Tensor, mask_channels: int | None = None) -> dict:
    """The image-to-video fields of a clip [3, T, H, W] in [-1, 1] conditioned on its first frame,
    as diffusers' Wan pipelines build them:
    ``first_frame`` [C, 1, h, w]: the first frame alone through the VAE (Wan2.2 TI2V's given frame);
    ``condition`` [m + C, t, h, w]: mask (1 on the first latent frame; m = the VAE's temporal factor,
    4) then the latents of [first frame, zero frames] (``WanImageToVideoPipeline.prepare_latents``)."""
    video = clip.unsqueeze(0)
    first = vae.encode(video[:, :, :1])[0].cpu()
    zeros = torch.zeros_like(video[:, :, 1:])
    latents = vae.encode(torch.cat([video[:, :, :1], zeros], dim=2))[0].cpu()
    m = mask_channels or vae.temporal_factor
    mask = torch.zeros(m, *latents.shape[1:])
    mask[:, 0] = 1
    return {"first_frame": first, "condition": torch.cat([mask, latents], dim=0)}


@torch.no_grad()
def first_frame_conditions(vae: WanVAEEncoder, image: CLIPImageEncoder | None, clip: torch.Tensor) -> dict:
    """Everything an image-to-video sample stores for a clip [3, T, H, W] in [-1, 1] conditioned on its
    first frame: ``image_conditions`` plus, with a CLIP encoder, ``image_embeds`` [L_img, D] of that frame.
    Only the first frame is read: a video's clip and an image followed by any frames give the same."""
    conds = image_conditions(vae, clip)
    if image is not None:
        conds["image_embeds"] = image.encode(clip[:, 0].unsqueeze(0))[0]
    return conds


def i2v_dataset_meta(vae: WanVAEEncoder, image: CLIPImageEncoder | None, latent_shape, height: int,
                     width: int) -> dict:
    """meta.json's image-to-video entries: ``task``, the encoders and per field its per-sample shape
    (``conditions``, as ``shard_dataset.ShardDataset`` reads them)."""
    c, t, h, w = latent_shape
    conditions = {"first_frame": [c, 1, h, w], "condition": [vae.temporal_factor + c, t, h, w]}
    meta = {"task": "i2v", "vae": vae.source, "conditions": conditions}
    if image is not None:
        meta["image_encoder"] = image.source
        conditions["image_embeds"] = list(image.encode(torch.zeros(1, 3, height, width)).shape[1:])
    return meta
