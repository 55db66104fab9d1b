"""TIR kernel generators for the low-bit linears.

`spec` holds the kernel contract (`spec.LinearKernel`); ``generic`` the kernels and helpers every LLVM CPU shares
(and the fake-quantized activations of the fallbacks); ``x86``, ``arm`` and ``cuda`` the kernels of one target each.
"""
