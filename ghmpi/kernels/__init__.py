"""Fast attention kernels with a pure-torch path beside each: Triton on CUDA GPUs, native C++ on
CPUs. `ghmpi.model.attention` picks the kernel for the device and dtype and falls back to torch."""
