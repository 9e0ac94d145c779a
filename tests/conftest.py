"""Test-wide environment. Set before any kernel module is imported (PLATFORM.md)."""
import os

# Triton reads this when a kernel is decorated: CPU tensors run through its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed on its CPU accelerator (gloo); a single process also needs the rendezvous vars.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("LOCAL_RANK", "0")
# Deterministic, quiet CPU runs on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
