"""dpfeta: differentially private image synthesis (DP-FETA) on Ray."""

__version__ = "0.1.0"
