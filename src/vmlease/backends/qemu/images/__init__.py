"""Images: the built-in ``tiny`` image builder and the image cache."""

from __future__ import annotations

from vmlease.backends.qemu.images._catalog import BUILDERS, Image, find_image, list_images
from vmlease.backends.qemu.images._tiny import build_tiny

__all__ = ["BUILDERS", "Image", "build_tiny", "find_image", "list_images"]
