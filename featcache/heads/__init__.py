"""Classifier heads trained on cached features; one module per head family."""
