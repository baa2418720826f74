"""Stand-in for transformers' tests/exporters/test_export.py (not in the sdist): the base class of ModelTesterMixin."""


class ExportTesterMixin:
    """No torch.export tests: the models ship an ONNX export, tested in tests/test_export.py."""
