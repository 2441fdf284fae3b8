"""psdclip.train"""
