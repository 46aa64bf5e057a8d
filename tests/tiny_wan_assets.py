"""Tiny random stand-ins of a Wan pipeline folder for tool tests (nothing is downloaded): vae/,
tokenizer/, text_encoder/ and, for image-to-video, image_encoder/ and image_processor/."""

import torch


def write_tiny_wan_folder(root, words, text_dim: int, clip_dim: int | None = None):
    """Writes the folders under ``root`` (seeded: the same weights every call) and returns ``root``.
    ``words``: the tokenizer's word-level vocabulary; ``clip_dim``: add a CLIP image encoder."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                     latents_std=[2.0, 1.5, 1.0, 0.5]).save_pretrained(root / "vae")
    tok = Tokenizer(tmodels.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=text_dim, d_kv=4, num_heads=2, d_ff=32, num_layers=2,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16)
                     ).save_pretrained(root / "text_encoder")
    if clip_dim is not None:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        CLIPVisionModel(CLIPVisionConfig(hidden_size=clip_dim, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=16, patch_size=8)).save_pretrained(
            root / "image_encoder")
        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
            root / "image_processor")
    return root
