"""psdclip.index"""
