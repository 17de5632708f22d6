"""Triton kernels of fastsr, installed as `fastsr.kernels`.

Every kernel here works on channels-last (NHWC) activations and has an eager reference
in `fastsr.ops`. Importing this package does not import Triton; each kernel module does.
"""
