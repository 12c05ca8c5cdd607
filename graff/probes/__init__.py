"""Cheap probes of the training state: curvature (optimizer hooks) and token entropy (forward hooks)."""
