"""neumo: chest X-ray pneumonia classification, from raw images to tuned, evaluated models."""

__version__ = "0.1.0"
