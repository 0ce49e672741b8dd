"""clipexport: upscale and export video clips with progress you can trust."""

__version__ = "0.1.0"
