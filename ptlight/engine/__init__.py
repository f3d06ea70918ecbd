"""Compute paths under the methods: log-probs from hidden states, prefix-shared packing, the
reference log-prob cache, and the CPU-only speed and memory paths."""
