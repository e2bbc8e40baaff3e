"""Loads the project's Hypothesis profile (properties/profiles.py) before any property module."""
from properties import profiles

profiles.load()
