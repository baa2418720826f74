"""The models that ship as remote code, one folder each (transformers' ``models/<name>/`` layout)."""
