"""Evaluation helpers shared by stages: gold-metric generation and scoring."""
