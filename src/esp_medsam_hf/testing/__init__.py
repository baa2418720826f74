"""Test doubles and demo scaffolding: not part of the runtime package.

:mod:`esp_medsam_hf.testing.localhub` is an embedded Hugging Face Hub on loopback (olah for reads, a small write
server for uploads) that the tests, ``esp-medsam demo`` and ``esp-medsam hub start`` publish to. It needs the
``testing`` extra (``pip install "esp-medsam-hf[testing]"``: olah) and the ``git`` binary. Nothing in the runtime
layers imports this package (``tests/test_architecture.py`` checks it).
"""
