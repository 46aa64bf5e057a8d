"""Evaluation of teachers and few-step students (docs/quality.md).

- ``toy_features``: the fixed analytic feature space of the toy video task (data/toy.py)
- ``metrics``: Frechet distance, mode coverage, precision, mode entropy, diversity
- ``sampling``: the multi-step teacher sampler (rcm.teacher_sampling: Euler with CFG) and the
  batched few-step student sampler
- ``toy_benchmark``: held-out data, generation and metrics in one call
- ``png`` / ``plot``: a dependency-free PNG canvas and the benchmark figure
"""
