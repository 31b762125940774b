"""What runs inside img2dataset's download processes: the network guard and the pixel limit.

img2dataset pickles its resizer into every download process (``spawn``).  The resizer made
here (:func:`make_guarded_resizer`, put in place of img2dataset's own for the length of one
``download`` call by :func:`guarded_download`) installs :mod:`vlp_core.ingest.netguard` in
the process that unpickles it, and reads each image's size from its header, refusing one over
``ingest.max_image_pixels`` before any pixel is decoded (a 48 KB PNG can claim 20000 x 20000
pixels, 1.2 GB decoded).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Iterable, Iterator, Optional

from img2dataset.resizer import Resizer

from vlp_core.ingest.netguard import install


def image_header_size(data: bytes) -> Optional[tuple[int, int]]:
    """``(width, height)`` from the image header, without decoding the pixels; None when the
    header cannot be read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # we judge the size ourselves
            try:
                with Image.open(io.BytesIO(data)) as im:
                    return int(im.size[0]), int(im.size[1])
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Exception:  # noqa: BLE001 - any unreadable header
        return None


def make_guarded_resizer(allowed_hosts: Iterable[tuple[str, int]], max_pixels: int):
    """A factory with img2dataset's ``Resizer(...)`` signature making :class:`GuardedResizer`s."""
    allowed = frozenset(allowed_hosts)

    def factory(*args, **kwargs):
        r = GuardedResizer(*args, **kwargs)
        r.vlp_allowed_hosts, r.vlp_max_pixels = allowed, int(max_pixels)
        return r

    return factory


class GuardedResizer(Resizer):
    """img2dataset's resizer that refuses images over the pixel limit before decoding them, and
    installs the network guard in each download process that unpickles it."""

    vlp_allowed_hosts: frozenset = frozenset()
    vlp_max_pixels: int = 0

    def __setstate__(self, state):  # in the download process
        self.__dict__.update(state)
        install(self.vlp_allowed_hosts)

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        size = image_header_size(img_stream.read())
        img_stream.seek(0)
        if size is None:
            return None, None, None, None, None, "image header unreadable (not decoded)"
        w, h = size
        if self.vlp_max_pixels and w * h > self.vlp_max_pixels:
            return None, None, None, None, None, (f"image is {w} x {h} = {w * h} pixels, over "
                                                  f"ingest.max_image_pixels={self.vlp_max_pixels} (not decoded)")
        return super().__call__(img_stream, blurring_bbox_list)


@contextlib.contextmanager
def guarded_download(allowed_hosts: Iterable[tuple[str, int]], max_pixels: int) -> Iterator[None]:
    """img2dataset's ``download`` makes :class:`GuardedResizer`s while this is open."""
    import importlib

    main = importlib.import_module("img2dataset.main")  # the module (img2dataset.main is also a function)
    saved = main.Resizer
    main.Resizer = make_guarded_resizer(allowed_hosts, max_pixels)
    try:
        yield
    finally:
        main.Resizer = saved
