"""meanflow: a training platform for one-step generative models of the MeanFlow family."""

__version__ = "0.1.0"
