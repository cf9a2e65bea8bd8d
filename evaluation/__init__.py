"""Offline evaluation: labeled benchmark domains built from real recordings."""
