"""The x86 int8-activation kernel and its dot-product intrinsics."""
