"""``esp-medsam cache``: show or empty the cache of ONNX exports the onnxruntime backend writes."""

from __future__ import annotations

import argparse

from esp_medsam_hf.models.esp_medsam import backends


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    sub.add_parser("info", help="where the cache is, its exports and their sizes, and its bound")
    sub.add_parser("clear", help="remove every cached ONNX export (only files the backend wrote)")


def run(args: argparse.Namespace) -> int:
    folder = backends.cache_dir()
    if args.cache_command == "clear":
        count, size = backends.clear_cache(folder)
        print(f"removed {count} export(s), {size / 1e6:.1f} MB, from {folder}")
        return 0
    exports = backends.cached_exports(folder) if folder.is_dir() else []
    total = sum(path.stat().st_size for path in exports)
    print(f"{folder}: {len(exports)} export(s), {total / 1e6:.1f} MB "
          f"(bound {backends.cache_limit_bytes() / 1e6:.0f} MB, ${backends.CACHE_SIZE_ENV})")
    for path in reversed(exports):  # most recently used first
        print(f"  {path.name}  {path.stat().st_size / 1e6:.1f} MB")
    return 0
