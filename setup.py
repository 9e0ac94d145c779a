"""Install the three code folders as one `echofm` namespace plus the `echofm` command.

`engine/`, `kernels/` and `loaders/` live at the repo root (the user's layout) but import
as `echofm.engine`, `echofm.kernels`, `echofm.loaders`; no top-level `engine` package
lands in site-packages.

torch is a range that the CPU wheel 2.13.0 satisfies: install it first (README), or pip
resolves an unpinned torch to a multi-GB CUDA build. GPU users bring their own CUDA torch.
"""
from setuptools import find_packages, setup

FOLDERS = ("engine", "kernels", "loaders")

packages = ["echofm"]
package_dir = {"echofm": "echofm"}
for folder in FOLDERS:
    for sub in [folder] + [f"{folder}.{p}" for p in find_packages(folder)]:
        name = "echofm." + sub
        packages.append(name)
        package_dir[name] = sub.replace(".", "/")

setup(
    name="echofm",
    version="0.1.0",
    description="EchoFM: echocardiography video foundation model and its pretraining engine",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"echofm.kernels": ["attention_table.json"]},  # the measured attention dispatch table
    install_requires=[
        "torch>=2.4,<2.15",
        "triton>=3.0",
        "nvidia-dali-cuda130>=2.0",
        "packaging<=26.3",  # DALI's pin; keeps `pip check` clean
        "deepspeed>=0.16",
        "webdataset>=0.2.100",
        "numba>=0.60",
        "av>=13",
        "numpy>=1.26",
        "pyyaml>=6",
        "pydicom>=3",
        "pillow>=10",
        "nibabel>=5",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "opencv-python-headless>=4.9",  # ingest: sector morphology, resize, polygon fill
    ],
    extras_require={
        "dev": ["pytest>=8"],
        "xformers": ["xformers>=0.0.28"],
    },
    entry_points={"console_scripts": ["echofm = echofm.engine.cli:main"]},
)
