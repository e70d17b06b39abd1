"""Deployment service."""
