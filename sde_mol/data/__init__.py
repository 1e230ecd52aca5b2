"""Datasets: QM9 from the qm9pack wheel and the host-side batch iterator."""
