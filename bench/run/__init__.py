"""The run: subsets, the variants' plan, the one unit loop, where units execute, and the pipeline."""
