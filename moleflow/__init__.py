"""MoLE-Flow: continual anomaly detection with LoRA experts in a normalizing flow."""
__version__ = "0.1.0"
