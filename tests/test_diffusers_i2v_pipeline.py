"""An exported I2V student runs in diffusers' ``WanImageToVideoPipeline`` (CPU, tiny local VAE /
CLIP / umT5 folders; nothing downloaded): tools/generate.py --image (a real process) and the
diffusers pipeline give the same latents from the same weights, image, prompt and noise.

The pipeline samples with the student's few-step rule through a scheduler written here (the
rCM sampler in flow-matching terms: at RF sigma s_k = sin t_k/(cos t_k + sin t_k) the step takes
x0 = x - s_k v and re-noises x = (1 - s_{k+1}) x0 + s_{k+1} eps_k with the sampler's keyed noise;
the pipeline starts from eps/(cos t_0 + sin t_0)). Everything else - prompt encoding, the image
through the VAE into Wan's mask + condition latents, CLIP embeddings, the transformer - is the
pipeline's own code. Tolerance: 1e-4 absolute/relative (float32 pipeline state vs the sampler's
float64 state between steps).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402

from rcm_megatron.convert.diffusers_wan import save_diffusers_wan  # noqa: E402
from rcm_megatron.models import WanDiT  # noqa: E402
from rcm_megatron.models.config import WanConfig  # noqa: E402
from rcm_megatron.rcm.rng import KeyedRNG  # noqa: E402
from rcm_megatron.rcm.sampling import OFFICIAL_MID_TIMES, sampling_times  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "<pad> </s> <unk> a red green ball cat dog runs jumps in the park bad quality".split()
TEXT_DIM, CLIP_DIM, STEPS, SEED = 16, 8, 2, 3
SHAPE = (4, 2, 2, 2)  # 5 frames of 16 x 16 through the tiny VAE (temporal 4, spatial 8)


class RCMFewStepScheduler(SchedulerMixin, ConfigMixin):
    """The student's few-step sampler as a diffusers scheduler (flow-matching state)."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000):
        self.trig_times, self.noises = None, None

    def set_sampler(self, trig_times, noises):
        self.trig_times, self.noises = [float(t) for t in trig_times], noises

    @staticmethod
    def rf_sigma(t: float) -> float:
        return math.sin(t) / (math.cos(t) + math.sin(t))

    def set_timesteps(self, num_inference_steps, device=None):
        self.sigmas = [self.rf_sigma(t) for t in self.trig_times[: num_inference_steps + 1]]
        self.timesteps = torch.tensor([1000.0 * s for s in self.sigmas[:-1]], dtype=torch.float32, device=device)
        self.k = 0

    def step(self, model_output, timestep, sample, return_dict=False):
        k = self.k
        x0 = sample.double() - self.sigmas[k] * model_output.double()
        s = self.sigmas[k + 1]
        x = x0 if s == 0 else (1 - s) * x0 + s * self.noises[k].double()
        self.k += 1
        return (x.to(sample.dtype),)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """vae/, text_encoder/, tokenizer/, image_encoder/, image_processor/ and the exported student transformer/."""
    from tiny_wan_assets import write_tiny_wan_folder

    root = write_tiny_wan_folder(tmp_path_factory.mktemp("wan_i2v_pipe"), WORDS, TEXT_DIM, CLIP_DIM)
    cfg = WanConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, in_channels=12,
                    out_channels=4, text_dim=TEXT_DIM, freq_dim=32, image_dim=CLIP_DIM)  # 4 noisy + 4 mask + 4 cond
    student = WanDiT(cfg)
    student.reset_parameters(7)
    save_diffusers_wan(student, root / "transformer")
    g = torch.Generator().manual_seed(1)
    from PIL import Image

    Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / "image.png")
    return root


def diffusers_latents(root, prompt):
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v

    if not hasattr(wan_i2v, "ftfy"):  # diffusers calls ftfy.fix_text even when ftfy is not installed; on this
        import types  # ASCII prompt fix_text is the identity

        wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    times = sampling_times(STEPS, OFFICIAL_MID_TIMES, 80.0)
    rng = KeyedRNG(SEED, 0)
    eps = rng.normal("sample.noise", [0], SHAPE)
    noises = [rng.normal(f"sample.renoise.{k}", [0], SHAPE) for k in range(STEPS - 1)]
    sched = RCMFewStepScheduler()
    sched.set_sampler(times, noises)
    pipe = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(root / "text_encoder"),
        vae=AutoencoderKLWan.from_pretrained(root / "vae"), scheduler=sched,
        image_processor=CLIPImageProcessor.from_pretrained(root / "image_processor"),
        image_encoder=CLIPVisionModel.from_pretrained(root / "image_encoder"),
        transformer=WanTransformer3DModel.from_pretrained(root / "transformer"))
    start = (eps / (math.cos(times[0]) + math.sin(times[0]))).float()
    out = pipe(image=Image.open(root / "image.png").convert("RGB"), prompt=prompt, height=16, width=16, num_frames=5,
               num_inference_steps=STEPS, guidance_scale=1.0, latents=start, output_type="latent",
               max_sequence_length=512)
    return out.frames


def test_exported_student_in_diffusers_pipeline_matches_generate(pipeline_folder, tmp_path):
    root = pipeline_folder
    prompt = "a red ball runs in the park"
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--hf-dir", str(root / "transformer"),
                        "--image", str(root / "image.png"), "--vae", str(root), "--image-encoder", str(root),
                        "--text-encoder", str(root), "--prompt", prompt, "--num-frames", "5", "--height", "16",
                        "--width", "16", "--steps", str(STEPS), "--seed", str(SEED), "--latents-only", "--device", "cpu",
                        "--out", str(tmp_path / "ours")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    ours = torch.load(tmp_path / "ours" / "latents.pt", weights_only=False)["student"]
    theirs = diffusers_latents(root, prompt)
    assert ours.shape == theirs.shape == (1, *SHAPE)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-4, atol=1e-4)
    assert ours.abs().max() > 0.1  # not a vacuous comparison of zeros
