"""Analyses of learned structure: pure functions of weights and activations."""
