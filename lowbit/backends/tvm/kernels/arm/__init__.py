"""The aarch64 int8-activation kernel and its sdot/smmla intrinsics."""
