"""Datasets: QM9 from the qm9pack wheel, the host-side batch iterator, and fixed data sets (a few molecules in
memory with their exact oracle: `fixed`)."""
