# rcm-megatron on an NGC PyTorch image (CUDA, PyTorch, Triton, NCCL, Transformer Engine, apex, DALI).
#
#   docker build -t rcm-megatron .
#   enroot import -o rcm-megatron.sqsh dockerd://rcm-megatron     # for SLURM + pyxis (IMAGE=...sqsh)
#
# The image's torch is kept: pip honours the base image's PIP_CONSTRAINT, and the project
# asks only for torch>=2.4. Nothing is downloaded at run time (HF_HUB_OFFLINE): models and
# data come from mounted folders.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /opt/rcm-megatron

# Dependencies first, so this layer stays cached while only the sources change.
COPY pyproject.toml README.md ./
RUN mkdir -p rcm_megatron && touch rcm_megatron/__init__.py \
    && pip install -e ".[hf,data]" \
    && python -c "import megatron.core, diffusers, transformers, webdataset, av; print('deps ok')"

COPY . .
RUN pip install --no-deps -e . \
    && python pretrain_rcm.py --help > /dev/null

# A non-root user for docker runs. (Under SLURM, pyxis/enroot runs the container as the
# submitting user anyway, with the repo and data mounted.)
RUN (id -u rcm > /dev/null 2>&1 || useradd --create-home --shell /bin/bash rcm) \
    && chown -R rcm:rcm /opt/rcm-megatron
USER rcm

CMD ["bash"]
