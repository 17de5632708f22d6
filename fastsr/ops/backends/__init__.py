"""Implementations of the fused ops, one module per backend family.

- `aten`:   aten convolutions (oneDNN on the CPU, cuDNN on CUDA) with the epilogues in
            place on their output, and aten.convolution_backward for the gradients. On CPU
            tensors this is the "cpu" implementation; on CUDA it is the "aten" floor, exactly
            what `eager_cl` in bench/run.py runs.
- `triton`: the Triton kernels of fastsr.kernels (CUDA, or CPU under TRITON_INTERPRET=1).

Which implementation runs is decided in fastsr.ops.dispatch (declared capabilities, timed
selection); the registered ops in fastsr.ops.conv2d / fastsr.ops.resblock call these.
"""
