"""Carving unit tests from real model runs (see the carving issue)."""
