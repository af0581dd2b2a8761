"""Tools built on both sides: the benchmark, the curious-server audit and the grad checks."""
