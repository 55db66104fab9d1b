"""The CUDA kernels: weight-only packed linear, the int8-activation (dp4a) linear, and int8 convolutions on it."""
