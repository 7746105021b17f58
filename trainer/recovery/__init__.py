"""Neighbour recovery (CheckFree / CheckFree+): rebuilding lost stages, and failure injection for experiments."""
