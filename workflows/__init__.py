"""psdclip.workflows: the psdclip command line, the demo and recipes."""
__version__ = "0.1.0"
