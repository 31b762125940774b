"""What runs inside img2dataset's download processes: the network guard and the pixel limit.

img2dataset pickles its resizer into every download process (``spawn``).  The resizer made
here (by the factory that :func:`guarded_download` puts in place of img2dataset's ``Resizer``,
with the calling thread's policy) installs :mod:`vlp_core.ingest.netguard` in
the process that unpickles it, and reads each image's size from its header, refusing one over
``ingest.max_image_pixels`` before any pixel is decoded (a 48 KB PNG can claim 20000 x 20000
pixels, 1.2 GB decoded).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import threading
import warnings
from typing import Iterable, Iterator, Optional

from img2dataset.resizer import Resizer

from vlp_core.ingest.netguard import install


def image_header_size(data: bytes | io.IOBase) -> Optional[tuple[int, int]]:
    """``(width, height)`` from the image header (bytes, or a seekable stream read from where it
    is), without decoding the pixels; None when the header cannot be read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # we judge the size ourselves
            try:
                with Image.open(data if hasattr(data, "read") else io.BytesIO(data)) as im:
                    return int(im.size[0]), int(im.size[1])
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Exception:  # noqa: BLE001 - any unreadable header
        return None


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
        size = image_header_size(img_stream)  # reads the header only, no copy of the bytes
        img_stream.seek(0)
        if size is None:
            return None, None, None, None, None, "image header unreadable (not decoded)"
        w, h = size
        if self.vlp_max_pixels and w * h > self.vlp_max_pixels:
            return None, None, None, None, None, (f"image is {w} x {h} = {w * h} pixels, over "
                                                  f"ingest.max_image_pixels={self.vlp_max_pixels} (not decoded)")
        return super().__call__(img_stream, blurring_bbox_list)


_policy = threading.local()  # this thread's (allowed hosts, pixel limit) while guarded_download is open
_install_lock = threading.Lock()


def _resizer_factory(*args, **kwargs) -> Resizer:
    """What ``img2dataset.main.Resizer`` is once :func:`guarded_download` has run: a
    :class:`GuardedResizer` carrying the calling thread's policy, or img2dataset's own resizer
    for a ``download`` called outside it (e.g. ``bench/ingest.py``'s bare run)."""
    policy = getattr(_policy, "value", None)
    if policy is None:
        return Resizer(*args, **kwargs)
    r = GuardedResizer(*args, **kwargs)
    r.vlp_allowed_hosts, r.vlp_max_pixels = policy
    return r


@contextlib.contextmanager
def guarded_download(allowed_hosts: Iterable[tuple[str, int]], max_pixels: int) -> Iterator[None]:
    """img2dataset's ``download``, called in this thread while this is open, makes
    :class:`GuardedResizer`s with this policy.  The factory is put in place once and for good
    (so concurrent ingests in threads never restore each other's), and the policy is per thread."""
    main = importlib.import_module("img2dataset.main")  # the module (img2dataset.main is also a function)
    with _install_lock:
        if main.Resizer is not _resizer_factory:
            main.Resizer = _resizer_factory
    _policy.value = (frozenset(allowed_hosts), int(max_pixels))
    try:
        yield
    finally:
        _policy.value = None
