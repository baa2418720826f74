"""Stand-in for transformers' tests/generation/test_utils.py (not in the sdist)."""


class GenerationTesterMixin:
    """Only named in ModelTesterMixin's check that a model which cannot generate does not inherit it."""
