"""Kernels and helpers shared by the LLVM CPU targets, and the activation codes every int8 kernel uses."""
