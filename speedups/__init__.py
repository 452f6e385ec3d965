"""Optimizations that give the same numbers as the reading path with less work, each proven by a test."""
