"""Core library of the video data engine: video IO, masks, storage, model backends, rendering, config."""

__version__ = "0.1.0"
