"""Data sources: embedded digits, CIFAR-10 through tfds data_source, and generic arrays."""
