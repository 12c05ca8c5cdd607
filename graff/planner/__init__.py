"""GRAFF's learned parts: the planner network and its files, the node features, the online
update and the peak-LR search. Imports probes and leaves, never schedulers."""
