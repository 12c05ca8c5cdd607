"""Meta-training of GRAFF's planner on a task family disjoint from the benchmark (dev only, not shipped)."""
