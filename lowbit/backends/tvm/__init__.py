"""The TVM backend: targets (`target`), low-bit TIR kernels (`kernels`)."""
