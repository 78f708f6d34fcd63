"""blip-bootstrap: BLIP's MED model and the CapFilt bootstrapping loop."""

__version__ = "0.1.0"
