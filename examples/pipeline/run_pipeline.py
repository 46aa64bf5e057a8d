#!/usr/bin/env python
"""The whole user path on one machine, every stage the real command line tool as a subprocess:

  videos     examples/pipeline/make_assets.py videos    H.264 + VP9 files and captions (PyAV)
  models     examples/pipeline/make_assets.py models    vae/ (AutoencoderKLWan), tokenizer/, text_encoder/ (umT5)
  prepare    tools/prepare_data.py                      videos -> webdataset shards of latents + umT5 embeddings
  pretrain   pretrain_rcm.py                            examples/configs/wan-1.3b.sh's flags on those shards,
                                                        random-init Wan-1.3B, TensorBoard with decoded videos
  generate   tools/generate.py                          the EMA student's 4-step mp4s (umT5 + VAE), and
                                                        1/2/4-step latents from the data's text embeddings
  export     tools/convert_checkpoint.py export         the EMA student as a diffusers WanTransformer3DModel
  diffusers  examples/pipeline/diffusers_sample.py      WanPipeline + the exported few-step scheduler, same
                                                        noise: its latents are compared with generate.py's

    python examples/pipeline/run_pipeline.py --work /tmp/rcm-pipeline            # one H100/H200, Wan-1.3B 480p
    python examples/pipeline/run_pipeline.py --work /tmp/rcm-pipeline-tiny --tiny  # CPU, tiny shapes, ~2 min

With your own data and weights, pass ``--manifest videos.csv --wan Wan2.1-T2V-1.3B-Diffusers``
(``--teacher`` for the teacher: otherwise random init) and the asset stages are skipped. Each
stage's wall time, rate (videos/s, tokens/s, model TFLOP/s) and peak memory go to
``benchmarks/results/pipeline_<date>_<card>.json`` (``--tiny``: WORK/pipeline_<date>_cpu.json)
with the command; a table is printed last. Exit 1 when a stage fails or generate.py and the
diffusers pipeline disagree beyond the tolerance (relative L2 error: 1e-4 in fp32, 3e-2 in bf16).

Disk and memory at real size (Wan-1.3B): training saves once, at its end (the shipped config's
--save-interval is replaced: a short run takes no interval saves). That checkpoint is 45.4 GB
(bf16 student and fake score 2.8 GB each, fp32 EMA 5.7 GB, each trained model's fp32 main
parameters and two Adam moments 17.0 GB; the frozen teacher is not saved: it is reloaded from
--teacher-checkpoint), so WORK needs ~55 GB free on a disk (the trainer refuses to start with
less). Keep WORK off /dev/shm: the save stages ~80 GB in host RAM besides (megatron-core's
distributed-optimizer state gathered to the CPU and copied by its writer, and the weights' GPU to
host copy). The trainer's log says each save's size, time and GB/s per phase
("saved checkpoint at iteration N to DIR: 45.41 GB in ... s (... GB/s; ...)").
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(REPO, "examples", "configs", "wan-1.3b.sh")
# flags of the shipped config the pipeline replaces: paths, the run's length (one save, at its end), on one GPU the batch
# and the tangent warmup (1000 iterations of sCM-only student steps): a short one, so that the run
# also takes the critic and the sCM + DMD student steps, the largest of the method's passes
REPLACED = {"--teacher-checkpoint", "--data", "--train-iters", "--global-batch-size", "--save-interval",
            "--log-interval", "--tangent-warmup-iters"}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
FULL = dict(videos=8, source_frames=85, frames=81, height=480, width=832, text_len=512, iters=20,
            model="wan-1.3b", text_encoder="small", video_interval=10, prompts=2)
TINY = dict(videos=4, source_frames=13, frames=9, height=64, width=64, text_len=64, iters=6,
            model="tiny", text_encoder="tiny", video_interval=3, prompts=2)


def config_flags(path: str = CONFIG) -> list[str]:
    """TRAIN_ARGS of a shipped config (sourced by bash, as the sbatch scripts do)."""
    out = subprocess.run(["bash", "-c", f'source "{path}"; printf "%s\\0" "${{TRAIN_ARGS[@]}}"'],
                         env={**os.environ, "TEACHER": "TEACHER", "DATA": "DATA", "VAE": ""}, check=True,
                         capture_output=True)
    return out.stdout.decode().split("\0")[:-1]


def drop_flags(flags: list[str], names) -> list[str]:
    out, skip = [], False
    for f in flags:
        if skip and not f.startswith("--"):
            continue
        skip = f in names
        if not skip:
            out.append(f)
    return out


class GpuMemoryPoll:
    """Peak GPU memory used (nvidia-smi, MiB) while a stage runs: its subprocesses are not ours to ask."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()

    def _read(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10)
            return max(float(v) for v in out.stdout.split()) if out.returncode == 0 and out.stdout.split() else None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def __enter__(self):
        self.base = self._read()
        if self.base is not None:
            threading.Thread(target=self._loop, daemon=True).start()
        return self

    def _loop(self):
        while not self._stop.wait(0.5):
            v = self._read()
            if v is not None:
                self.peak = max(self.peak or 0.0, v)

    def __exit__(self, *exc):
        self._stop.set()


class Stages:
    def __init__(self, log_dir: str):
        self.records, self.log_dir = [], log_dir
        os.makedirs(log_dir, exist_ok=True)

    def run(self, name: str, cmd: list[str], **rates) -> dict:
        """Run ``cmd`` (output to the console and WORK/logs/NAME.log); its wall time, peak RSS, GPU memory."""
        print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
        log_path = os.path.join(self.log_dir, f"{name}.log")
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1"}
        t0 = time.time()
        with open(log_path, "w") as log, GpuMemoryPoll() as gpu:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        rec = {"stage": name, "command": shlex.join(cmd), "seconds": round(time.time() - t0, 2),
               "peak_rss_gib": round(usage.ru_maxrss / 1024 ** 2, 2), "exit_code": proc.returncode, "log": log_path}
        if gpu.peak is not None:
            rec["peak_gpu_used_gib"] = round(gpu.peak / 1024, 2)
        rec.update(rates)
        self.records.append(rec)
        if proc.returncode != 0:
            raise SystemExit(f"run_pipeline.py: stage {name} failed (exit {proc.returncode}); see {log_path}")
        return rec


def sampling_rates(rec: dict, cfg, shape, text_len: int, runs: list[tuple[int, int, float]]) -> None:
    """videos/s, tokens/s and model TFLOP/s of sampling runs [(samples, steps, seconds)]."""
    from rcm_megatron.training.throughput import num_tokens, wan_forward_flops

    tokens = num_tokens(cfg, shape)
    n = sum(s for s, _, _ in runs)
    secs = sum(t for _, _, t in runs)
    flops = sum(s * k * wan_forward_flops(cfg, tokens, text_len).total for s, k, _ in runs)
    rec.update(sampling_seconds=round(secs, 2), videos_per_sec=n / max(secs, 1e-9),
               tokens_per_sec=sum(s * k * tokens for s, k, _ in runs) / max(secs, 1e-9),
               model_tflops=flops / max(secs, 1e-9) / 1e12)


def parse_seconds(log_path: str, marker: str) -> float:
    """The sampling time a tool printed ('student: N sample(s) in X s')."""
    for line in open(log_path):
        if line.startswith(marker) and " in " in line:
            return float(line.rsplit(" in ", 1)[1].split()[0])
    return float("nan")


def training_rates(rec: dict, metrics_path: str) -> None:
    """Medians over the iterations after the first (warm-up) of the trainer's own metrics."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    steady = rows[1:] or rows

    def med(key):
        vals = sorted(r[key] for r in steady if isinstance(r.get(key), (int, float)))
        return vals[len(vals) // 2] if vals else None

    peaks = [r[k] for r in rows for k in ("mem_peak_allocated_gib", "mem_peak_rss_gib") if k in r]
    rec.update(iterations=len(rows), videos_per_sec=med("samples_per_sec"), tokens_per_sec=med("tokens_per_sec"),
               model_tflops=med("model_tflops_per_gpu"), mfu=med("mfu"),
               peak_allocated_gib=round(max(peaks), 2) if peaks else None,
               loss_last=rows[-1].get("loss"), phases=sorted({r.get("phase") for r in rows}))


def checkpoint_save(log_path: str) -> dict | None:
    """The trainer's last 'saved checkpoint at iteration N to DIR: X GB in Y s (Z GB/s; phases)' line."""
    import re

    found = None
    for line in open(log_path, errors="replace"):
        m = re.search(r"saved checkpoint at iteration (\d+) to .*: ([\d.]+) GB in ([\d.]+) s \(([\d.na]+) GB/s; (.*)\)",
                      line)
        if m:
            found = {"iteration": int(m.group(1)), "gb": float(m.group(2)), "seconds": float(m.group(3)),
                     "gb_per_s": float(m.group(4)), "phases": m.group(5)}
    return found


def tensorboard_tags(log_dir: str) -> dict:
    """{tag: [steps]} of the image/video summaries in the run's event files (None without tensorboard)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0})
        acc.Reload()
        return {t: [e.step for e in acc.Images(t)] for t in acc.Tags().get("images", [])}
    except Exception as e:  # noqa: BLE001 - a partial tensorboard install writes events but may not read them
        return {"unreadable": f"{type(e).__name__}: {e}"}


def compare(generate_dirs: dict, diffusers_out: str, dtype: str, text_dir: str) -> dict:
    """generate.py's latents against WanPipeline's: the data's text embeddings at 1/2/4 steps, and
    the captions through each side's own umT5 ('text_4_step')."""
    import torch

    ref = torch.load(diffusers_out, map_location="cpu")
    out = {"tolerance_rel_l2": TOLERANCE[dtype], "dtype": dtype}
    pairs = {f"{steps}_step": (os.path.join(d, "latents.pt"), ref["context"][steps])
             for steps, d in generate_dirs.items()}
    pairs["text_4_step"] = (os.path.join(text_dir, "latents.pt"), ref["prompt"][4])
    for key, (path, b) in pairs.items():
        a = torch.load(path, map_location="cpu")["student"].double()
        b = b.double()
        out[key] = {"rel_l2": (a - b).norm().item() / max(a.norm().item(), 1e-30),
                    "max_abs": (a - b).abs().max().item(), "max_ref": a.abs().max().item()}
    out["ok"] = all(v["rel_l2"] <= TOLERANCE[dtype] for k, v in out.items() if k.endswith("_step"))
    return out


def card_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "cpu"


def table(records: list[dict]) -> str:
    cols = [("stage", "{}"), ("seconds", "{:.1f}"), ("videos_per_sec", "{:.3g}"), ("tokens_per_sec", "{:.4g}"),
            ("model_tflops", "{:.3g}"), ("peak_allocated_gib", "{:.2f}"), ("peak_gpu_used_gib", "{:.2f}"),
            ("peak_rss_gib", "{:.2f}")]
    rows = [[c for c, _ in cols]] + [[fmt.format(r[c]) if r.get(c) is not None else "-" for c, fmt in cols]
                                     for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_pipeline.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--work", required=True, help="folder for everything the run writes")
    p.add_argument("--tiny", action="store_true", help="tiny DiT / VAE / umT5 and shapes, on CPU in about 2 minutes")
    p.add_argument("--manifest", help="your videos (a manifest tools/prepare_data.py reads); default: made here")
    p.add_argument("--wan", help="a Wan2.1 diffusers folder with vae/, text_encoder/, tokenizer/; default: made here")
    p.add_argument("--teacher", help="--teacher-checkpoint for pretrain_rcm.py (default: random-init --model)")
    p.add_argument("--iters", type=int, help="training iterations (default 20; --tiny 6)")
    p.add_argument("--videos", type=int, help="videos to make (default 8; --tiny 4)")
    p.add_argument("--text-encoder-config", choices=("xxl", "small", "tiny"),
                   help="umT5 made here: small (default; umT5-XXL's width 4096 and layer shape, 2 layers), xxl "
                        "(umT5-XXL's 24-layer encoder: ~1-2 min more, loaded three times), tiny (--tiny's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", help="JSON path, or a folder for the default name (default "
                                     "benchmarks/results/pipeline_<date>_<card>.json; --tiny: WORK/pipeline_<date>_cpu.json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = dict(TINY if args.tiny else FULL)
    s["iters"] = args.iters or s["iters"]
    s["videos"] = args.videos or s["videos"]
    s["text_encoder"] = args.text_encoder_config or s["text_encoder"]
    for flag in ("manifest", "wan", "teacher"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            print(f"run_pipeline.py: error: --{flag} {path}: no such file or directory", file=sys.stderr)
            return 2
    missing = [m for m in (["av"] if args.manifest is None else []) + ["diffusers", "transformers", "webdataset"]
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"run_pipeline.py: error: missing Python packages {missing} (pip install {' '.join(missing)}; PyAV is "
              "the 'av' package, its manylinux wheels bring FFmpeg with libx264 and libvpx)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("tensorboard") is None:
        print("run_pipeline.py: warning: tensorboard is not installed: training writes metrics.jsonl only, no "
              "TensorBoard videos (pip install tensorboard)", file=sys.stderr)
    if s["iters"] < 1 or s["videos"] < 1:
        print("run_pipeline.py: error: --iters and --videos must be positive", file=sys.stderr)
        return 2
    sys.path.insert(0, REPO)
    from rcm_megatron.models.config import preset

    py, work = sys.executable, os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    stages = Stages(os.path.join(work, "logs"))
    gpu = not args.tiny
    device = ["--device", "cpu"] if args.tiny else []
    started = datetime.datetime.now(datetime.timezone.utc)
    manifest = args.manifest or os.path.join(work, "videos", "manifest.csv")
    wan = args.wan or os.path.join(work, "wan")
    try:
        if args.manifest is None:
            r = stages.run("videos", [py, os.path.join(HERE, "make_assets.py"), "videos", "--out",
                                      os.path.dirname(manifest), "--count", str(s["videos"]), "--frames",
                                      str(s["source_frames"]), "--height", str(s["height"]), "--width", str(s["width"])])
            r["videos_per_sec"] = round(s["videos"] / r["seconds"], 3)
        if args.wan is None:
            stages.run("models", [py, os.path.join(HERE, "make_assets.py"), "models", "--out", wan, "--manifest",
                                  manifest, "--text-encoder-config", s["text_encoder"], *(["--tiny"] if args.tiny else []),
                                  *device])
        shards = os.path.join(work, "shards")
        r = stages.run("prepare", [py, "tools/prepare_data.py", "--input", manifest, "--output", shards, "--vae", wan,
                                   "--text-encoder", wan, "--num-frames", str(s["frames"]), "--height", str(s["height"]),
                                   "--width", str(s["width"]), "--text-len", str(s["text_len"]),
                                   "--samples-per-shard", "4", *device])
        from rcm_megatron.data.shards import ShardDataset

        data = ShardDataset(shards)
        shape, n_data = data.latent_shape, len(data)
        r["videos_per_sec"] = round(n_data / r["seconds"], 3)
        cfg = preset(s["model"])
        from rcm_megatron.training.throughput import num_tokens

        r["tokens_per_sec"] = round(n_data * num_tokens(cfg, shape) / r["seconds"], 1)
        # fixed prompts: the data's first captions and their text embeddings (generate.py's --context-file)
        k = min(s["prompts"], n_data)
        items = [data.load(i) for i in range(k)]
        data.close()
        ctx_file = os.path.join(work, "prompts_context.pt")
        import torch

        torch.save({"context": torch.stack([it["context"] for it in items]), "prompts": [it["prompt"] for it in items]},
                   ctx_file)
        run_dir = os.path.join(work, "run")
        flags = drop_flags(config_flags(), REPLACED)
        if not gpu:
            flags = drop_flags(flags, {"--use-distributed-optimizer"})  # megatron-core's DDP needs CUDA
        teacher = ["--teacher-checkpoint", args.teacher] if args.teacher else ["--model", s["model"]]
        r = stages.run("pretrain", [py, "pretrain_rcm.py", *flags, *teacher, "--data", shards, "--train-iters",
                                    str(s["iters"]), "--global-batch-size", "1", "--log-interval", "1",
                                    "--tangent-warmup-iters", str(max(1, s["iters"] // 5)),
                                    "--save", os.path.join(run_dir, "checkpoints"),
                                    "--log-dir", os.path.join(run_dir, "tensorboard"),
                                    "--log-video-interval", str(s["video_interval"]), "--vae", wan,
                                    "--log-video-context", ctx_file, "--log-video-prompts", "1",
                                    "--log-video-teacher-steps", "4", "--seed", str(args.seed), *device])
        training_rates(r, os.path.join(run_dir, "tensorboard", "metrics.jsonl"))
        r["checkpoint_save"] = checkpoint_save(r["log"])
        r["tensorboard_images"] = tensorboard_tags(os.path.join(run_dir, "tensorboard"))
        ckpt = os.path.join(run_dir, "checkpoints")
        dt = ["--bf16"] if gpu else []
        prompts = [it["prompt"] for it in items]
        r = stages.run("generate", [py, "tools/generate.py", "--load", ckpt, *sum((["--prompt", p] for p in prompts), []),
                                    "--text-encoder", wan, "--vae", wan, "--steps", "4", "--seed", str(args.seed),
                                    "--out", os.path.join(work, "samples"), *dt, *device])
        sampling_rates(r, cfg, shape, s["text_len"], [(k, 4, parse_seconds(r["log"], "student:"))])
        gen_dirs = {}
        for steps in (1, 2, 4):
            gen_dirs[steps] = os.path.join(work, f"latents_{steps}step")
            r = stages.run(f"generate_{steps}step", [py, "tools/generate.py", "--load", ckpt, "--context-file", ctx_file,
                                                     "--latents-only", "--steps", str(steps), "--seed", str(args.seed),
                                                     "--out", gen_dirs[steps], *dt, *device])
            sampling_rates(r, cfg, shape, s["text_len"], [(k, steps, parse_seconds(r["log"], "student:"))])
        exported = os.path.join(work, "student-diffusers")
        stages.run("export", [py, "tools/convert_checkpoint.py", "export", "--load", ckpt, "--out", exported, "--ema",
                              "--dtype", "bf16" if gpu else "fp32", "--overwrite"])
        diff_out = os.path.join(work, "diffusers_latents.pt")
        r = stages.run("diffusers", [py, os.path.join(HERE, "diffusers_sample.py"), "--transformer", exported,
                                     "--pipeline", wan, "--scheduler-out", os.path.join(work, "student-scheduler"),
                                     "--context-file", ctx_file, *sum((["--prompt", p] for p in prompts), []),
                                     "--steps", "1", "2", "4", "--seed", str(args.seed),
                                     "--latent-shape", *map(str, shape), "--text-len", str(s["text_len"]),
                                     "--out", diff_out, "--decode", os.path.join(work, "samples"), *dt, *device])
        sampling_rates(r, cfg, shape, s["text_len"],
                       [(k, n, parse_seconds(r["log"], f"context: {k} sample(s), {n} step(s)")) for n in (1, 2, 4)])
        agreement = compare(gen_dirs, diff_out, "bf16" if gpu else "fp32", os.path.join(work, "samples"))
    finally:
        card = card_name() if gpu else "cpu"
        date = started.strftime("%Y%m%dT%H%M%SZ")
        default = (os.path.join(work, f"pipeline_{date}_cpu.json") if args.tiny else
                   os.path.join(REPO, "benchmarks", "results", f"pipeline_{date}_{card.replace(' ', '-')}.json"))
        path = args.results or default
        if args.results and (os.path.isdir(args.results) or args.results.endswith(os.sep)):
            path = os.path.join(args.results, os.path.basename(default))
        result = {"card": card, "date": started.isoformat(), "command": shlex.join([sys.executable, *sys.argv]),
                  "settings": s, "total_seconds": round(sum(r["seconds"] for r in stages.records), 1),
                  "stages": stages.records}
        if "agreement" in locals():
            result["generate_vs_diffusers"] = agreement
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {path}\n\n{table(stages.records)}\ntotal {result['total_seconds']:.1f} s", flush=True)
    for key in ("1_step", "2_step", "4_step", "text_4_step"):
        a = agreement[key]
        print(f"generate.py vs WanPipeline, {key.replace('_', ' ')}: relative L2 {a['rel_l2']:.2e}, max |diff| "
              f"{a['max_abs']:.3g} (|latent| up to {a['max_ref']:.3g}); tolerance {agreement['tolerance_rel_l2']:g} "
              f"({agreement['dtype']})")
    if not agreement["ok"]:
        print("run_pipeline.py: error: generate.py and the diffusers pipeline disagree beyond the tolerance",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
