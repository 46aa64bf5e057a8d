"""Run pretrain_rcm.py with one loss term's sign flipped (a planted bug), for checking that the
quality test catches it: ``python tests/quality_mutants.py {scm,dmd,critic,none} -- ARGS``.

The flip is applied by replacing the regression functions the step plan calls
(rcm_megatron.rcm.step.*_regression) with versions whose fixed step points the other way:
  scm:    F_theta -> sg(F_theta) - g        (instead of + g)
  dmd:    G       -> sg(G) + grad           (instead of - grad)
  critic: gradient ascent on the critic's denoising loss (loss -> -loss).
Nothing in the package is edited; the rest of the run is the real entry point.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plant(which: str) -> None:
    from rcm_megatron.rcm import losses, step

    if which == "scm":
        def scm_regression(student, targets, context, scale=100.0, cond=None):
            F = losses.predict(student, targets.x_t, targets.t, context, cond).F
            return losses._regress(F, targets.valid, scale, step=-targets.g, cond=cond)
        step.scm_regression = scm_regression
    elif which == "dmd":
        def dmd_regression(student, targets, context, scale=1.0, cond=None):
            G = losses.predict(student, targets.last_x, targets.last_t, context, cond).x0
            return losses._regress(G, targets.valid, scale, step=targets.grad, cond=cond)
        step.dmd_regression = dmd_regression
    elif which == "critic":
        original = losses.critic_regression

        def critic_regression(fake_score, targets, context, scale=1.0, cond=None):
            out = original(fake_score, targets, context, scale, cond)
            return losses.LossTerms(loss=-out.loss, per_sample=-out.per_sample, target=out.target)
        step.critic_regression = critic_regression
    elif which != "none":
        raise SystemExit(f"quality_mutants.py: unknown mutant {which!r} (scm, dmd, critic, none)")


def main() -> int:
    which, argv = sys.argv[1], sys.argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    plant(which)
    import pretrain_rcm

    return pretrain_rcm.main(argv)


if __name__ == "__main__":
    sys.exit(main())
