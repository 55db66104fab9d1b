"""The CUDA kernels: weight-only packed linear and the int8-activation (dp4a) linear."""
