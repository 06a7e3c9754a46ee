"""mmaccel: make vision and video LLMs fast."""
__version__ = "0.1.0"
