"""GPU check: the distributed optimizer's state survives a checkpoint round trip exactly.

    torchrun --nproc-per-node 2 benchmarks/dist_opt_state_roundtrip.py --out DIR [TRAINING FLAGS...]

Trains the tiny model 3 iterations with ``--use-distributed-optimizer`` (bf16, rCM, a cosine
schedule), saves, then builds a second trainer in the same processes that loads the
checkpoint, and compares, per rank, every optimizer-state tensor (fp32 main parameters,
Adam moments, step) and the learning rate of both optimizers, and the model parameters.
Then runs the resumed trainer to iteration 6 and a straight one to 6 (same processes) and
compares their losses. Prints the largest differences and writes DIR/roundtrip.json. Further
flags go to every trainer (e.g. ``--pipeline-model-parallel-size 2`` on 4 GPUs, or
``--optimizer-cpu-offload``).
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rcm_megatron.training.arguments import parse_args  # noqa: E402
from rcm_megatron.training.megatron_compat import inner_optimizers  # noqa: E402
from rcm_megatron.training.trainer import Trainer  # noqa: E402

COMMON = ["--model", "tiny", "--bf16", "--use-distributed-optimizer", "--micro-batch-size", "1",
          "--global-batch-size", "4", "--student-update-freq", "2", "--rollout-max-steps", "2", "--lr-decay-style",
          "cosine", "--lr-warmup-iters", "1", "--lr-decay-iters", "6", "--min-lr", "1e-5", "--log-interval", "1"]


def inner_torch_optimizers(trained) -> list:
    """The torch optimizers of a TrainedModel (megatron-core's inner ones, or the local AdamW)."""
    if trained.optimizer_format != "megatron-distributed":
        return [trained.optimizer]
    return [o.optimizer for o in inner_optimizers(trained.optimizer)]


def optimizer_tensors(trained) -> dict:
    """Every tensor of a TrainedModel's inner (torch) optimizers."""
    out = {}
    inners = inner_torch_optimizers(trained)
    for i, inner in enumerate(inners):
        for g, group in enumerate(inner.param_groups):
            out[f"{i}.{g}.lr"] = torch.tensor(group["lr"])
            for j, p in enumerate(group["params"]):
                out[f"{i}.{g}.{j}.param"] = p.detach().float().cpu().clone()
                for k, v in inner.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        out[f"{i}.{g}.{j}.{k}"] = v.detach().float().cpu().clone()
    return out


def model_tensors(model) -> dict:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def snapshot(trainer) -> dict:
    """CPU copies of both models and both optimizers' state."""
    return {"student_opt": optimizer_tensors(trainer.trained["student"]),
            "fake_opt": optimizer_tensors(trainer.trained["fake_score"]),
            "student": model_tensors(trainer.student), "fake": model_tensors(trainer.fake)}


def compare(a: dict, b: dict) -> dict:
    res = {"missing": sorted(set(a) ^ set(b))[:10], "worst": {}}
    for k in sorted(set(a) & set(b)):
        d = (a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0
        kind = k.rsplit(".", 1)[-1]
        if d > res["worst"].get(kind, (0.0, ""))[0]:
            res["worst"][kind] = (d, k)
        res["worst"].setdefault(kind, (0.0, k))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="the CPU path (plain AdamW): checks this script")
    a, extra = ap.parse_known_args()
    ck = os.path.join(a.out, "ckpt")
    common = [*COMMON, *extra]
    if a.cpu:
        common = [x for x in common if x not in ("--bf16", "--use-distributed-optimizer")]
    first = Trainer(*parse_args([*common, "--train-iters", "3", "--log-dir", os.path.join(a.out, "first"),
                                 "--save", ck]))
    first.run()
    saved = snapshot(first)
    second = Trainer(*parse_args([*common, "--train-iters", "6", "--log-dir", os.path.join(a.out, "second"),
                                  "--load", ck]))
    second.build()
    loaded = snapshot(second)
    report = {k: compare(saved[k], loaded[k]) for k in saved}
    steps = {k: sorted({float(v) for n, v in loaded[k].items() if n.endswith(".step")}) for k in ("student_opt", "fake_opt")}
    steps_saved = {k: sorted({float(v) for n, v in saved[k].items() if n.endswith(".step")}) for k in ("student_opt", "fake_opt")}
    shared = {k: len({st["step"].data_ptr() for o in inner_torch_optimizers(second.trained[d])
                      for st in o.state.values()})
              for k, d in (("student_steps_tensors", "student"), ("fake_steps_tensors", "fake_score"))}
    # then: the resumed run to iteration 6 against a straight run to 6, same processes
    second.run()
    third = Trainer(*parse_args([*common, "--train-iters", "6", "--log-dir", os.path.join(a.out, "straight")]))
    third.run()
    worst = 0.0
    if dist.get_rank() == 0:
        rows = {d: [json.loads(x) for x in open(os.path.join(a.out, d, "metrics.jsonl"))] for d in ("second", "straight")}
        by_it = {r["iteration"]: r for r in rows["straight"]}
        for r in rows["second"]:
            s_ = by_it[r["iteration"]]
            for k in r:
                if k.startswith("loss"):
                    worst = max(worst, abs(r[k] - s_[k]) / abs(s_[k]))
        print(f"resumed vs straight, iterations {[r['iteration'] for r in rows['second']]}: max rel loss diff {worst:.3g}")
    rec = {"rank": dist.get_rank(), "report": report, "steps_loaded": steps, "steps_saved": steps_saved,
           "distinct_step_tensors": shared, "resumed_vs_straight_max_rel_loss_diff": worst}
    allrec = [None] * dist.get_world_size()
    dist.all_gather_object(allrec, rec)
    if dist.get_rank() == 0:
        for r in allrec:
            print(f"rank {r['rank']}: steps saved {r['steps_saved']} loaded {r['steps_loaded']}, distinct step "
                  f"tensors {r['distinct_step_tensors']}")
            for k, v in r["report"].items():
                print(f"  {k}: missing {v['missing']} worst {v['worst']}")
        with open(os.path.join(a.out, "roundtrip.json"), "w") as f:
            json.dump(allrec, f, indent=1)


if __name__ == "__main__":
    main()
