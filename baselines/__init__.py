"""Baseline detectors shipped with LTBench behind the common detector contract."""
