"""Pure graph analyses and rewrites: load, solve permutation spaces, partition, fold."""
