"""Name maps and layouts of the image-to-video and Wan2.2 models, both directions.

The maps are compiled from one template table per format (diffusers <-> ours, original Wan
<-> diffusers), so the reverse direction is derived, never kept by hand: every name of every
architecture round-trips, the original I2V names agree with diffusers' own single-file
converter, and folders written by us load in diffusers (and back) bit for bit, the
two-expert Wan2.2 layout (transformer / transformer_2 and the boundary) included."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from diffusers import WanTransformer3DModel  # noqa: E402

from rcm_megatron.convert import load_diffusers_wan  # noqa: E402
from rcm_megatron.convert.diffusers_wan import (NAME_MAP, REVERSE_MAP, _map_name, diffusers_to_ours,  # noqa: E402
                                                load_diffusers_wan_experts, ours_to_diffusers, save_diffusers_wan,
                                                save_diffusers_wan_experts)
from rcm_megatron.convert.wan_original import (config_from_wan_original, diffusers_to_original_name,  # noqa: E402
                                               infer_config_from_shapes, original_to_diffusers_name, original_to_ours,
                                               ours_to_original)
from rcm_megatron.models import WanDiT, WanExperts, preset  # noqa: E402

SMALL = dict(num_attention_heads=4, attention_head_dim=32, text_dim=64, ffn_dim=256, num_layers=2, rope_max_seq_len=64)
I2V = dict(in_channels=36, out_channels=16, image_dim=48, added_kv_proj_dim=128)


def diffusers_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**{**SMALL, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", ["tiny", "wan-i2v-14b-480p", "wan2.2-ti2v-5b", "wan2.2-i2v-a14b"])
def test_every_name_round_trips(name):
    """ours -> diffusers -> ours and ours -> original -> ours are the identity, and injective."""
    with torch.device("meta"):
        names = list(WanDiT(preset(name)).state_dict())
    to_diffusers = {n: _map_name(n, REVERSE_MAP) for n in names}
    assert None not in to_diffusers.values() and len(set(to_diffusers.values())) == len(names)
    assert all(_map_name(d, NAME_MAP) == n for n, d in to_diffusers.items())
    to_original = {n: diffusers_to_original_name(d) for n, d in to_diffusers.items()}
    assert None not in to_original.values() and len(set(to_original.values())) == len(names)
    assert all(original_to_diffusers_name(o) == to_diffusers[n] for n, o in to_original.items())


def test_i2v_names_match_diffusers_and_its_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    m = diffusers_model(**I2V)
    sd = {k: v for k, v in m.state_dict().items()}
    ours = diffusers_to_ours(sd, expected=set(WanDiT(load_diffusers_wan(m).config).state_dict()))
    assert set(ours_to_diffusers(ours)) == set(sd)
    original = ours_to_original(ours)
    assert {"img_emb.proj.0.weight", "img_emb.proj.4.bias", "blocks.1.cross_attn.k_img.weight",
            "blocks.0.cross_attn.v_img.bias", "blocks.1.cross_attn.norm_k_img.weight"} <= set(original)
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert set(converted) == set(sd) and all(torch.equal(converted[k], sd[k]) for k in sd)
    back = original_to_ours(original)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(KeyError, match=r"not original Wan parameter names: \['blocks.0.cross_attn.q_img.weight'\]"):
        original_to_ours({**original, "blocks.0.cross_attn.q_img.weight": torch.zeros(1)})


def test_original_configs_tell_wan21_i2v_from_wan22_by_the_weights():
    """Both releases say model_type 'i2v'; only Wan2.1's has the CLIP branch (img_emb)."""
    cfg = {"_class_name": "WanModel", "dim": 128, "ffn_dim": 256, "freq_dim": 256, "in_dim": 36, "model_type": "i2v",
           "num_heads": 4, "num_layers": 2, "out_dim": 16, "text_dim": 64}
    shapes = {n: tuple(t.shape) for n, t in ours_to_original(WanDiT(preset("tiny").replace(
        in_channels=36, out_channels=16, image_dim=48)).state_dict()).items()}
    assert config_from_wan_original(cfg, shapes).image_dim == 48
    assert infer_config_from_shapes(shapes, num_heads=4) == config_from_wan_original(cfg, shapes)
    no_clip = {n: s for n, s in shapes.items() if "img" not in n}
    assert config_from_wan_original(cfg, no_clip).image_dim is None
    assert config_from_wan_original({**cfg, "model_type": "ti2v", "in_dim": 48}).in_channels == 48
    with pytest.raises(ValueError, match="model_type 'flf2v' is not supported"):
        config_from_wan_original({**cfg, "model_type": "flf2v"})
    with pytest.raises(ValueError, match="image-conditioned Wan .* cannot tell image_dim"):
        infer_config_from_shapes({**no_clip, "img_emb.proj.1.weight": (2,)}, num_heads=4)


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_folder_round_trip_through_diffusers(kind, tmp_path):
    """diffusers folder -> ours -> our folder -> diffusers' from_pretrained: the same tensors and config."""
    ref = diffusers_model(**(I2V if kind == "i2v" else dict(in_channels=48, out_channels=48)))
    ref.save_pretrained(tmp_path / "ref")
    ours = load_diffusers_wan(tmp_path / "ref")
    save_diffusers_wan(ours, tmp_path / "out")
    got = WanTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    for key in ("in_channels", "out_channels", "image_dim", "added_kv_proj_dim", "num_layers", "ffn_dim"):
        assert got.config[key] == ref.config[key], key
    want = ref.state_dict()
    assert set(got.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items())


def test_experts_folder_both_directions(tmp_path):
    """Wan2.2 A14B: transformer (high noise) / transformer_2 (low noise) and model_index.json's
    boundary_ratio; writing into a copy of a pipeline folder keeps its other entries."""
    high, low = diffusers_model(1, in_channels=36, out_channels=16), diffusers_model(2, in_channels=36, out_channels=16)
    src = tmp_path / "pipe"
    high.save_pretrained(src / "transformer")
    low.save_pretrained(src / "transformer_2")
    (src / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9,
                                                      "vae": ["diffusers", "AutoencoderKLWan"]}))
    experts = load_diffusers_wan_experts(src)
    assert experts.boundary_ratio == 0.9 and experts.config.in_channels == 36
    x, ctx = torch.randn(2, 36, 1, 4, 4), torch.randn(2, 3, 64)
    t = torch.tensor([950.0, 10.0])
    with torch.no_grad():
        out = experts(x, t, ctx)
        torch.testing.assert_close(out[:1], high(x[:1], t[:1], ctx[:1], return_dict=False)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:], low(x[1:], t[1:], ctx[1:], return_dict=False)[0], rtol=1e-5, atol=1e-5)

    dst = tmp_path / "student"
    dst.mkdir()
    (dst / "model_index.json").write_text((src / "model_index.json").read_text())
    moved = WanExperts(experts.low_noise, experts.high_noise, 0.875)  # swapped, another boundary
    save_diffusers_wan_experts(moved, dst)
    index = json.loads((dst / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    got = WanTransformer3DModel.from_pretrained(dst / "transformer")
    assert all(torch.equal(v, low.state_dict()[k]) for k, v in got.state_dict().items())
    back = load_diffusers_wan_experts(dst)
    assert back.boundary_ratio == 0.875
    assert torch.equal(back.high_noise.proj_out.weight, experts.low_noise.proj_out.weight)

    (tmp_path / "single" / "transformer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"not a two-expert .* no \['transformer_2'\] subfolder"):
        load_diffusers_wan_experts(tmp_path / "single")
    (src / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="has no boundary_ratio; pass boundary_ratio"):
        load_diffusers_wan_experts(src)
    assert load_diffusers_wan_experts(src, boundary_ratio=0.5).boundary_ratio == 0.5
