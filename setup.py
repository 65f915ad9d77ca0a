"""Installs ``kernels`` and ``audiomae``; compiles ``csrc/`` when CUDA is there or asked for.

``AUDIOMAE_BUILD_CUDA=1`` forces the CUDA extension build (nvcc needed, no GPU needed: without
one it targets ``TORCH_CUDA_ARCH_LIST``, by default sm_90 plus PTX);
``AUDIOMAE_BUILD_CUDA=0`` skips it. Otherwise it is built when torch sees a GPU, and where it is not
built, the first use compiles it just in time and caches it (see ``kernels/_cuda_extension.py``).
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

PINS = [
    "torch==2.11.0",
    "torchaudio==2.11.0",
    "triton==3.6.0",
    # numpy 2.4 breaks Triton 3.6's interpreter on loops with a run-time bound (the CPU test path).
    "numpy<2.4",
]

DEV = [
    "pytest>=8",
    "pytest-benchmark>=4",
    "hypothesis>=6",
    "matplotlib>=3.8",
    "ninja",
    # timm's Block and SwinTransformerV2CrBlock are an independent oracle for the model tests;
    # timm needs torchvision, pinned to the build that matches torch 2.11.
    "timm>=1.0",
    "torchvision==0.26.0",
]


def cuda_extensions():
    wanted = os.environ.get("AUDIOMAE_BUILD_CUDA")
    if wanted == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as error:
        if wanted == "1":  # asked for: no silent pure-Python build
            raise SystemExit(f"AUDIOMAE_BUILD_CUDA=1 needs torch importable by this build ({error}); "
                             "use pip install --no-build-isolation") from error
        return [], {}
    if wanted != "1" and not torch.cuda.is_available():
        return [], {}
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ext", os.path.join("kernels", "_cuda_extension.py"))
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    ext.ensure_arch_list()
    modules = [
        CUDAExtension(f"kernels._{name}_cuda", [os.path.relpath(s) for s in ext.extension_sources(name)],
                      extra_compile_args={"cxx": ext.CXX_FLAGS, "nvcc": ext.NVCC_FLAGS})
        for name in ext.extension_names()
    ]
    base = BuildExtension.with_options(use_ninja=True)

    class BuildAndStamp(base):
        """Builds, then records each extension's sources digest beside it, so that the loader can
        tell a build of older sources (kernels/_cuda_extension.py, ``_stale``)."""

        def run(self):
            super().run()
            for name in ext.extension_names():
                built = self.get_ext_fullpath(f"kernels._{name}_cuda")
                if os.path.exists(built):
                    ext.stamp_path(built).write_text(ext.sources_digest(name) + "\n")

    return modules, {"build_ext": BuildAndStamp}


ext_modules, cmdclass = cuda_extensions()
CSRC_PACKAGES = ["csrc"] + [f"csrc.{p.name}" for p in sorted(Path("csrc").iterdir()) if p.is_dir()]

setup(
    name="audiomae-kernels",
    version="0.1.0",
    description="Drop-in AudioMAE and MAE-AST with fused Triton and CUDA kernels, and the benchmarks that prove them",
    # csrc/ ships too (as data beside the packages), so an installed copy can build the extension
    # just in time: kernels/_cuda_extension.py reads it from the folder next to kernels/.
    packages=find_packages(include=["kernels", "kernels.*", "audiomae", "audiomae.*", "benches"]) + CSRC_PACKAGES,
    package_data={"": ["*.cu", "*.cpp", "*.h", "*.cuh"]},
    python_requires=">=3.10",
    install_requires=PINS + ["safetensors", "tqdm", "soundfile", "scipy", "tensorboard"],
    extras_require={"dev": DEV, "xformers": ["xformers==0.0.35"]},
    entry_points={"console_scripts": ["audiomae=audiomae.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
