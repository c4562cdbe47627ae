# The Triton interpreter must be chosen before any @triton.jit function is created, so this runs first.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
