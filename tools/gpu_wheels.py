#!/usr/bin/env python
"""A folder of wheels for ``tools/gpu_check.py --wheels`` on a GPU machine with CUDA torch
(Python 3.12, x86_64) and no network. Run it where there is network:

    python tools/gpu_wheels.py --output wheels      # = make gpu-wheels

Downloads, without dependencies and as binary wheels only, exactly ``RUNTIME_REQUIREMENTS``:
what this package, megatron-core and the ``te_export`` step's ``transformers`` import at
run time that a machine with only CUDA torch (and torch's own dependencies: filelock,
typing-extensions, sympy, networkx, jinja2, fsspec, setuptools) lacks. Prints each
wheel's size and the total, and fails when the total reaches ``LIMIT_MIB`` (what may be
handed to the GPU machine is 64 MiB in all, the repository included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

LIMIT_MIB = 60
PYTHON_VERSION = "3.12"
# megatron-core 0.19.2 is tagged manylinux_2_24/2_28 only; the others need the older tags.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "any",
)
ABIS = ("cp312", "abi3", "none")

RUNTIME_REQUIREMENTS = [
    # setup.py's install_requires, less torch (the machine's own) and tensorboard (imported
    # only when logging.tensorboard is on, which gpu_check turns off).
    "megatron-core==0.19.2",
    "numpy",
    "pyyaml",
    "sentencepiece",
    "pillow",
    "psutil",
    "packaging",  # megatron-core imports it
    # The editable install of this repository, without build isolation.
    "setuptools",
    "wheel",
    # te_export loads the export with transformers; these are the modules its import
    # chain loads (found by importing it on a machine with only torch). Its other
    # dependencies (pydantic, typer, rich ...) serve the command line and the
    # Hub kernels, which the check never uses. Versions: those .venv312 tests with.
    "transformers==5.25.0",
    # from_pretrained refuses to run without kernels (a version check, even unused).
    "kernels==0.19.1",
    "tomlkit",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "huggingface-hub==2.4.0",
    "hf-xet==1.8.0",
    "httpx2==2.17.0",
    "httpcore2==2.17.0",
    "h11",
    "anyio",
    "idna",
    "truststore",
    "regex",
    "tqdm",
    "click",
]


def download_command(output: Path, requirements: Sequence[str] = RUNTIME_REQUIREMENTS) -> List[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for abi in ABIS:
        command += ["--abi", abi]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + ["--dest", str(output), *requirements]


def wheel_sizes(folder: Path) -> List[Tuple[str, int]]:
    return sorted(
        ((path.name, path.stat().st_size) for path in Path(folder).glob("*.whl")),
        key=lambda item: -item[1],
    )


def check_size(folder: Path, limit_mib: float = LIMIT_MIB) -> int:
    """Prints each wheel's size and the total; 0 when under ``limit_mib``, else 1."""
    sizes = wheel_sizes(folder)
    for name, size in sizes:
        print(f"{size / 2**20:8.2f} MiB  {name}")
    total = sum(size for _, size in sizes)
    print(f"{total / 2**20:8.2f} MiB  total of {len(sizes)} wheels (limit {limit_mib} MiB)")
    if total >= limit_mib * 2**20:
        print(f"FAIL: {folder} holds {total / 2**20:.2f} MiB, at or over {limit_mib} MiB")
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("wheels"))
    parser.add_argument(
        "--check-only", action="store_true", help="only print the sizes of an existing folder"
    )
    args = parser.parse_args(argv)
    if not args.check_only:
        args.output.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(download_command(args.output))
        if result.returncode != 0:
            return result.returncode
    return check_size(args.output)


if __name__ == "__main__":
    sys.exit(main())
