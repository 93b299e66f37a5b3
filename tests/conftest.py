"""Test-wide settings: Triton kernels run on CPU through the interpreter (set before triton loads)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
