"""The CUDA C++ backend's launchers, one module per op family with the same function names and signatures as
the Triton launchers in kernels/<family>.py: they turn tensors into the raw pointers, sizes, strides, dtype
codes and stream handles that csrc/bindings.cpp takes. Inputs arrive validated by ops/."""
