"""Optical flow, strain, head-motion compensation and 7-ROI motion features."""
