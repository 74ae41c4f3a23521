"""Speed: the attention patch, the module's levers (compile, losses, checkpointing), distributed helpers,
host-sync-free timing, and throughput / profiling callbacks."""
