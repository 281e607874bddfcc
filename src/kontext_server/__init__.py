"""kontext-server: self-hosted FLUX.1 Kontext image editing behind fal.ai's queue API."""

__version__ = "0.1.0"
__all__ = ["__version__"]
