"""Estimators over per-model arrays: memorization and influence, controlled findings, subgroup accuracy."""
