"""Install the three code folders as one `echofm` namespace plus the `echofm` command.

`engine/`, `kernels/` and `loaders/` live at the repo root (the user's layout) but import
as `echofm.engine`, `echofm.kernels`, `echofm.loaders`; no top-level `engine` package
lands in site-packages.

torch: install it first (README), or pip resolves it to a multi-GB CUDA build. The range
is what was tested: the full suite on 2.13 (CPU), the kernel and model tests on 2.11
(CUDA 13, H200). GPU users bring their own CUDA torch.

DALI (the stream, `shards verify`) comes as an extra that matches the CUDA driver:
`echofm[cuda13]` (nvidia-dali-cuda130) or `echofm[cuda12]` (nvidia-dali-cuda120). CPU-only
machines need one too: DALI's CPU pipeline ships in both wheels; `make` installs cuda13,
the smaller one.

Every requirement has an upper bound (tested versions in the comments): the next minor
release for the packages whose internals the engine leans on (torch, triton, DALI,
DeepSpeed, numba), the next major release for the rest (PyAV: the next after 18), so a new
release is tested before its bound moves. tests/test_packaging.py checks the bounds, the
extras and the Makefile.

Recipes and benchmarks are part of the product: `recipes/` and `benchmarks/` (top-level
folders too) install as `echofm/recipes` and `echofm/benchmarks`, beside `echofm/engine` as
in the checkout, so `echofm pretrain echofm_tiny`, `echofm demo` and `echofm bench NAME`
work from any folder after a plain `pip install .` (engine/resources.py finds them).
"""
from setuptools import find_packages, setup

FOLDERS = ("engine", "kernels", "loaders")
DATA_FOLDERS = ("recipes", "benchmarks")  # no __init__.py: shipped as files, run as scripts

packages = ["echofm"]
package_dir = {"echofm": "echofm"}
for folder in FOLDERS:
    for sub in [folder] + [f"{folder}.{p}" for p in find_packages(folder)]:
        name = "echofm." + sub
        packages.append(name)
        package_dir[name] = sub.replace(".", "/")
for folder in DATA_FOLDERS:
    packages.append(f"echofm.{folder}")
    package_dir[f"echofm.{folder}"] = folder

# Literals (not computed): benchmarks/gpu_kit.sh and tests/test_packaging.py read them with ast.
setup(
    name="echofm",
    version="0.1.0",
    description="EchoFM: echocardiography video foundation model and its pretraining engine",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={
        "echofm.kernels": ["attention_table.json"],  # the measured attention dispatch table
        "echofm.recipes": ["pretrain/*.yaml", "downstream/*.yaml"],
        "echofm.benchmarks": ["*.sh", "*.md", "results/*"],  # the scripts (*.py) come as modules
    },
    install_requires=[
        "torch>=2.11,<2.14",  # tested: 2.13.0+cpu (everything), 2.11+cu130 (GPU kernels, model)
        "triton>=3.6,<3.10",  # tested: 3.9.0 (interpreter), 3.6.0 (H200)
        "deepspeed>=0.19.8,<0.20",  # tested: 0.19.8 (engine/checkpoint.py allow-lists its checkpoint classes)
        "numba>=0.60,<0.69",  # tested: 0.68.1
        "av>=13,<19",  # tested: 18.1.0 (bundles FFmpeg with libvpx-vp9 and libx264)
        "numpy>=1.26,<3",  # tested: 2.4.6
        "pyyaml>=6,<7",
        "pydicom>=3,<4",  # tested: 3.0.2
        "pillow>=10,<14",  # tested: 13.0.0 (pydicom's JPEG decoder)
        "nibabel>=5,<6",  # tested: 5.4.2
        "safetensors>=0.4,<1",  # tested: 0.8.0
        "pyarrow>=14,<30",  # tested: 26.0.1 (`echofm embed` writes Parquet, `echofm neighbours` reads it)
        "tensorboard>=2.15,<3",
        "matplotlib>=3.8,<4",
        "tqdm>=4.66,<5",
        "opencv-python-headless>=4.9,<6",  # tested: 5.0.0; ingest: sector morphology, resize, polygon fill
    ],
    extras_require={
        # DALI by CUDA major version (pick the driver's; either serves a CPU-only machine).
        "cuda13": ["nvidia-dali-cuda130>=2.4,<2.5"],  # tested: 2.4.0 (the CPU pipeline)
        "cuda12": ["nvidia-dali-cuda120>=2.4,<2.5"],  # same release, CUDA 12 build
        # Optional experiment trackers (logging.wandb / logging.mlflow; imported only when enabled).
        "wandb": ["wandb>=0.17,<1"],  # tested: 0.31.0 (offline mode; run.log / run.finish)
        "mlflow": [
            "mlflow-skinny>=2.10,<4",  # tested: 3.18.0; the tracking client `import mlflow` (no server)
            # MLflow 3's default store is sqlite:///mlflow.db, which skinny cannot open without these
            "sqlalchemy>=2,<3",  # tested: 2.1.9
            "alembic>=1.10,<2",  # tested: 1.20.1
        ],
        # Tests: pytest; pytest-timeout, so a hung test fails with its stack instead of stalling
        # CI (pytest.ini); webdataset to prove the shards are plain WebDataset (test_packaging);
        # the real tracker clients (tests/test_trackers.py: W&B offline, MLflow on a local store);
        # moto's S3 server and boto3 (tests/test_remote.py starts a server on localhost).
        "dev": ["pytest>=8,<10", "pytest-timeout>=2.2,<3", "webdataset>=0.2.100,<2",
                "wandb>=0.17,<1", "mlflow-skinny>=2.10,<4", "sqlalchemy>=2,<3", "alembic>=1.10,<2",
                "moto[server]>=5,<6", "boto3>=1.34,<2"],
        # Shards on S3 / MinIO / Ceph (data.shards=s3://...; docs/data.md): the AWS client only.
        "s3": ["boto3>=1.34,<2"],  # tested: 1.44
    },
    entry_points={"console_scripts": ["echofm = echofm.engine.cli:main"]},
)
