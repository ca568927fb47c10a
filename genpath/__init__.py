"""genpath: a generative stain and augmentation engine for computational pathology."""

__version__ = "0.1.0"
