"""Architecture oracle: our WanDiT loaded from diffusers' WanTransformer3DModel (random
weights, fp32, CPU) returns what diffusers returns."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

from rcm_megatron.convert import load_diffusers_wan  # noqa: E402


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    m = WanTransformer3DModel(num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
                              text_dim=64, ffn_dim=256, num_layers=2, rope_max_seq_len=64).eval()
    with torch.no_grad():  # perturb every parameter so norms/biases/tables are not at their init
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("shape,text_len", [
    ((2, 16, 3, 8, 12), 7),    # batch 2, non-square, odd frames
    ((1, 16, 5, 6, 10), 512),  # text length 512
    ((2, 16, 1, 4, 4), 13),    # single frame (image)
    ((1, 16, 4, 10, 6), 33),
])
def test_matches_diffusers(ref, shape, text_len):
    ours = load_diffusers_wan(ref).eval()
    g = torch.Generator().manual_seed(sum(shape) + text_len)
    x = torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g) * 1000
    ctx = torch.randn(shape[0], text_len, 64, generator=g)
    with torch.no_grad():
        a = ref(x, t, ctx, return_dict=False)[0]
        b = ours(x, t, ctx)
    assert ((a - b).norm() / a.norm()).item() <= 1e-5


def test_load_from_folder_and_reject_mismatch(ref, tmp_path):
    ref.save_pretrained(tmp_path / "wan")
    ours = load_diffusers_wan(tmp_path / "wan")
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([321.0]), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x, t, ctx), ref(x, t, ctx, return_dict=False)[0], rtol=1e-5, atol=1e-5)
    # A config whose depth disagrees with the weights: missing keys are listed.
    cfg = json.loads((tmp_path / "wan" / "config.json").read_text())
    cfg["num_layers"] = 3
    (tmp_path / "wan" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match=r"missing keys \['blocks\.2\."):
        load_diffusers_wan(tmp_path / "wan")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_diffusers_wan(tmp_path / "nothing")
