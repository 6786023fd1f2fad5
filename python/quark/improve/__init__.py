"""Continuous improvement: knowledge refresh (more modules join this package from other branches)."""
