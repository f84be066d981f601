"""fastvit: a Vision Transformer whose hot paths are fused Triton kernels.

The repository folder kernels/ installs as the subpackage fastvit.kernels (package_dir), so nothing named
plain `kernels` lands in site-packages: that import name belongs to another PyPI project.
"""
from setuptools import setup

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-benchmark>=4",
    "pytest-xdist>=3",
    "timm>=1.0",
    "safetensors>=0.4",
    "transformers>=4.40",
    "hypothesis>=6",
    "scikit-learn>=1.3",
    "threadpoolctl>=3",
    "matplotlib>=3.7",
]

setup(
    name="fastvit",
    version="0.1.0",
    description="Vision Transformer on fused Triton kernels, a drop-in replacement for timm's VisionTransformer",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastvit", "fastvit.ops", "fastvit.kernels"],
    package_dir={"fastvit": "fastvit", "fastvit.ops": "fastvit/ops", "fastvit.kernels": "kernels"},
    # the oldest tested pair: torch 2.11 with triton 3.6 (the GPU machine's); CI runs torch 2.14 with triton 3.8
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux'", "numpy"],
    extras_require={
        "test": TEST_REQUIRES,
        # The environment CI and `make test` use: the CUDA build of torch, which also runs on CPU, pinned
        # to versions the local package cache serves.
        "pinned": ["torch==2.14.1", "torchvision==0.29.1"] + TEST_REQUIRES,
    },
    entry_points={"console_scripts": ["fastvit=fastvit.__main__:main"]},
    license="Apache-2.0",
)
