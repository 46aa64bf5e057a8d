"""Model FLOPs of the Wan DiT and the rCM passes, rates, MFU, memory readout, latent previews."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rcm_megatron.models import WanConfig, WanDiT, preset
from rcm_megatron.rcm import RCMConfig
from rcm_megatron.rcm.schedule import Phase
from rcm_megatron.training.throughput import (
    average_iteration_flops, latent_grid, memory_metrics, num_tokens, peak_tflops, phase_flops,
    throughput_metrics, wan_forward_flops,
)

CFG = WanConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, in_channels=4,
                out_channels=4, text_dim=24, freq_dim=32)


def measured(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("shape,text_len", [((2, 6, 4), 5), ((3, 4, 8), 7)])
def test_forward_and_tangent_counts_match_torch_flop_counter(shape, text_len):
    torch.manual_seed(0)
    m = WanDiT(CFG).eval()
    x = torch.randn(1, 4, *shape)
    t = torch.full((1,), 400.0)
    ctx = torch.randn(1, text_len, 24)
    s = num_tokens(CFG, x.shape)
    assert s == shape[0] * shape[1] * shape[2] // 4
    fw = wan_forward_flops(CFG, s, text_len)
    with torch.no_grad():
        assert measured(lambda: m(x, t, ctx)) == fw.total
    assert measured(lambda: m.forward_with_tangent(x, t, ctx, torch.randn_like(x), torch.ones(1))) == fw.tangent
    # backward = 2x forward for the with-grad pass (the convention; torch counts the same for matmuls)
    m.requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    assert measured(lambda: m(xg, t, ctx).square().sum().backward()) == pytest.approx(3 * fw.total, rel=0.02)


def test_wan_sizes_and_phase_accounting():
    wan13 = preset("wan-1.3b")
    s = num_tokens(wan13, (16, 21, 60, 104))
    assert s == 32760
    fw = wan_forward_flops(wan13, s, 512)
    # linears ~ 2 * 1.3e9 params * 32760 tokens = 8.2e13; self-attention 30 * 4 S^2 D = 1.98e14
    # (one layer's 6.6e12 is what the cuDNN SDPA figure of docs/design.md §7, 11.3 ms at 586 TFLOP/s, counts)
    assert fw.token_linear == pytest.approx(8.19e13, rel=0.01) and fw.self_attention == 30 * 4 * s * s * 1536
    assert 4 * s * s * 1536 / 11.3e-3 / 1e12 == pytest.approx(583, rel=0.01)
    assert fw.self_attention / fw.total > 0.65
    assert 2.0 < fw.tangent / fw.total < 2.7
    f = fw.total
    st = phase_flops(wan13, s, 512, Phase("student", ("scm", "dmd")))
    assert st["scm_teacher_cfg"] == 2 * f and st["scm_grad"] == 3 * f and st["scm_tangent"] == fw.tangent
    assert st["dmd_rollout"] == 2.5 * f and st["dmd_grad"] == 3 * f
    assert st["total"] == pytest.approx((2 + 3 + 2.5 + 1 + 2 + 3) * f + fw.tangent)
    cr = phase_flops(wan13, s, 512, "critic", rollout_max_steps=4, rollout_random_steps=False)
    assert cr == {"critic_rollout": 4 * f, "critic_grad": 3 * f, "total": 7 * f}
    assert phase_flops(wan13, s, 512, "teacher")["total"] == 3 * f
    assert phase_flops(wan13, s, 512, ("dcm",))["total"] == 6 * f
    with pytest.raises(ValueError, match="subset of scm, dmd, dcm"):
        phase_flops(wan13, s, 512, ("lpips",))
    rcm = RCMConfig.preset("wan-1.3b")  # F = 5: 4 critic steps, then a student step
    avg = average_iteration_flops(wan13, s, 512, rcm)
    assert avg == pytest.approx((4 * phase_flops(wan13, s, 512, "critic")["total"] + st["total"]) / 5)


def test_rates_and_peaks():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.4 and peak_tflops("NVIDIA GH200 480GB") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("Some CPU") is None
    r = throughput_metrics(flops=8 * 494.7e12, seconds=2.0, num_gpus=8, tokens=65520, peak=989.4)
    assert r["model_tflops_per_gpu"] == pytest.approx(247.35) and r["mfu"] == pytest.approx(0.25)
    assert r["tokens_per_sec"] == pytest.approx(32760)
    if not torch.cuda.is_available():
        assert "mfu" not in throughput_metrics(1e12, 1.0, 1)
        mem = memory_metrics()
        assert mem["mem_peak_rss_gib"] > 0.01


def test_latent_grid():
    lat = torch.zeros(3, 16, 5, 4, 6)
    lat[:, 0] = torch.linspace(-3, 3, 6)  # red ramps left to right
    lat[1, 1] = 5.0
    img = latent_grid(lat, max_samples=2, max_frames=3, scale=2, pad=1)
    assert img.dtype.name == "uint8" and img.shape == (2 * 8 + 1, 3 * 12 + 2, 3)
    tile = img[:8, :12]
    assert tile[0, 0, 0] == 0 and tile[0, -1, 0] == 255  # normalized per sample to the full range
    assert (img[8, :, :] == 255).all()  # white separator between samples
    gray = latent_grid(torch.randn(1, 1, 2, 4, 4), scale=1)
    assert gray.shape == (4, 10, 3) and (gray[..., 0] == gray[..., 1]).all()
    const = latent_grid(torch.full((1, 4, 1, 2, 2), 7.0))  # no NaN on a constant input
    assert const.shape == (8, 8, 3)
    with pytest.raises(ValueError, match="expected \\[B, C, T, H, W\\]"):
        latent_grid(torch.zeros(2, 3, 4))
