"""kis-megatron: Megatron-style pretraining for the knowledge infusion scaling law.

Install torch first (``pip install torch==2.13.0`` for the CPU build, or keep the CUDA
build you have): the range below is satisfied by both, so pip never swaps it out.

The floor is the oldest torch the suite has passed under: 2.11.0 (with triton 3.6.0 on Python
3.12, the GPU image's versions: the fast tier, ``bash benchmarks/gpu_rehearsal.sh``, recorded in
benchmarks/RESULTS.md). The newest API the code calls, ``return_outputs`` of the pipelining
schedules' ``step``, came after 2.9 (pytorch/pytorch#159251), so 2.10 might work too; it has not
been installed here, so it is not claimed. Everyday testing: torch 2.13.0, triton 3.9.0.
"""

from setuptools import find_packages, setup

setup(
    name="kis-megatron",
    version="0.1.0",
    description="Megatron-style LLM pretraining with Triton kernels, built to measure and "
    "predict the knowledge infusion scaling law (arXiv 2509.19371).",
    python_requires=">=3.10",
    packages=find_packages(include=["kis_megatron", "kis_megatron.*", "kis_kernels", "kis_kernels.*"]),
    install_requires=[
        "torch>=2.11,<3",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "safetensors>=0.4",
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6.80",
            "triton>=3.6",
            "megatron-core>=0.9",
            "transformers>=4.45",
            "safetensors>=0.4",
        ],
        "gpu": ["triton>=3.6", "liger-kernel>=0.5", "transformers>=4.45"],
        "hf": ["transformers>=4.45"],
    },
    entry_points={
        "console_scripts": [
            "kis-train=kis_megatron.train:main",
        ]
    },
)
