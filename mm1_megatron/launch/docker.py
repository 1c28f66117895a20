"""Dockerfile on a pinned NGC PyTorch image: torch, Transformer Engine, apex and NCCL come
with it; megatron-core and this package are installed into it.

NGC PyTorch images (25.03 and later) set ``PIP_CONSTRAINT=/etc/pip/constraint.txt``, which
pins every Python package the image was built with. The Dockerfile keeps that constraint:
pip then takes the image's own torch build (a ``2.13.0a0`` pre-release in 26.07, which
satisfies ``torch>=2.10`` because it is already installed) and fails loudly instead of
swapping it for a PyPI wheel, which would drop NVIDIA's CUDA, NCCL and Transformer Engine
builds. A check after the install proves torch was left alone.
"""

from __future__ import annotations

import shlex

from mm1_megatron.launch.plan import LaunchPlan

FILE_NAME = "Dockerfile"
# What the image needs from the repository: the package (setup.py reads README.md), the
# configs the jobs name with --config, and the cluster overlays.
COPIED_PATHS = ("setup.py", "README.md", "mm1_megatron", "configs", "cluster")


_BODY = """\
#
# Build from the repository root, push, and name the pushed image in
# cluster.container.image:
#   docker build -f DIR/Dockerfile -t {image} .
#   docker push {image}
FROM {base_image}

# The base image sets PIP_CONSTRAINT=/etc/pip/constraint.txt (every package it was built
# with, torch and Transformer Engine included). It stays set: pip keeps the image's torch,
# or fails rather than replace it; the check after the install proves it.
ENV PYTHONUNBUFFERED=1
WORKDIR {workdir}
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch.version
RUN pip install --no-cache-dir {megatron}
COPY setup.py README.md ./
COPY mm1_megatron ./mm1_megatron
RUN pip install --no-cache-dir --no-build-isolation . \\
 && python -c "import torch; print(torch.__version__)" | cmp - /tmp/torch.version \\
 && python -c "import megatron.core, mm1_megatron"
COPY configs ./configs
COPY cluster ./cluster
"""


def render_dockerfile(plan: LaunchPlan) -> str:
    container = plan.cluster.container
    header = "".join(f"# {line}\n" for line in plan.header("docker"))
    return header + _BODY.format(
        image=container.image,
        base_image=container.base_image,
        workdir=container.workdir,
        megatron=shlex.quote(f"megatron-core=={container.megatron_core}"),
    )
