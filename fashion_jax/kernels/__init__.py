"""Kernels: the convolution and pooling formulations (`ops`), Winograd F(2,3) (`winograd`) and the
C++ kernels compiled on first use (`native`, `csrc/`; built per ISA level and cached by
`native_build`). They import nothing of the package but
`support.paths`; models choose one by name (`conv_impl`, `pool_impl`)."""
