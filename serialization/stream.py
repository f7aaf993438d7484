"""StreamDecoder: decode codec messages from bytes that arrive in chunks of any size.

For sockets and pipes, where a message may be split across reads or several may arrive in
one: ``feed()`` bytes, iterate for the messages completed so far, ``close()`` at the end.
Each frame is parsed and decoded by :mod:`serialization.codec`, with the same guarantees on
hostile input as :func:`serialization.unpackb`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from serialization.codec import (
    _TORCH_ALLOC_MIN,
    HEADER_SIZE,
    _as_bytes_view,
    _decode_frame,
    _parse_header,
)
from serialization.errors import DecodeError
from serialization.limits import DEFAULT_LIMITS, Limits

__all__ = ["StreamDecoder"]


class StreamDecoder:
    """Decode messages from bytes that arrive in chunks of any size.

    ``feed()`` bytes, then iterate to get every message completed so far; ``close()`` at the
    end of the stream raises if a message was cut off. A message that spans chunks is
    assembled once into a buffer its tensors then view (no second copy). After a
    DecodeError the stream cannot be resynchronised and every later call raises.

    Args:
        limits: bounds for untrusted input; a header over ``max_message_bytes`` is refused
            before its bytes are buffered.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._chunks: deque[memoryview] = deque()
        self._avail = 0
        self._frame: tuple[int, int, int] | None = None
        self._error: DecodeError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes fed but not yet returned as part of a message."""
        return self._avail

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes. A mutable buffer is copied, since its owner may reuse it."""
        self._check_usable()
        view = _as_bytes_view(data)
        if not isinstance(data, bytes):
            view = memoryview(bytes(view))
        if len(view):
            self._chunks.append(view)
            self._avail += len(view)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self._check_usable()
        try:
            return self._next()
        except DecodeError as exc:
            self._error = exc
            raise

    def close(self) -> None:
        """Declare the end of the stream.

        Raises:
            DecodeError: bytes remain: a message was cut off, or one was fed but not read.
        """
        self._check_usable()
        if not self._avail:
            return
        try:
            if self._frame is None and self._avail >= HEADER_SIZE:
                self._frame = _parse_header(self._peek_header(), self._limits)
        except DecodeError as exc:
            self._error = exc
            raise
        if self._frame is None:
            problem = f"stream ended inside a message header: have {self._avail} of {HEADER_SIZE} bytes"
        elif self._avail >= self._frame[2]:
            problem = f"{self._avail} bytes hold a message that was not read; iterate before close()"
        else:
            problem = f"stream ended inside a message: have {self._avail} of {self._frame[2]} bytes"
        self._error = DecodeError(problem)
        raise self._error

    def _check_usable(self) -> None:
        if self._error is not None:
            raise DecodeError(f"stream decoder is unusable after an earlier error: {self._error}")

    def _take(self, n: int, into: np.ndarray | None) -> memoryview:
        """Remove ``n`` bytes from the front: a slice of the first chunk, or copied into ``into``."""
        if into is None:
            first = self._chunks.popleft()
            out = first[:n]
            if len(first) > n:
                self._chunks.appendleft(first[n:])
        else:
            out, pos = memoryview(into), 0
            while pos < n:
                first = self._chunks.popleft()
                k = min(n - pos, len(first))
                out[pos: pos + k] = first[:k]
                pos += k
                if len(first) > k:
                    self._chunks.appendleft(first[k:])
        self._avail -= n
        return out

    def _peek_header(self) -> memoryview:
        head = bytearray()
        for chunk in self._chunks:
            head += chunk[: HEADER_SIZE - len(head)]
            if len(head) == HEADER_SIZE:
                break
        return memoryview(head)

    def _next(self) -> Any:
        if self._frame is None:
            if self._avail < HEADER_SIZE:
                raise StopIteration
            self._frame = _parse_header(self._peek_header(), self._limits)
        body_len, payload_start, frame_len = self._frame
        if self._avail < frame_len:
            raise StopIteration
        owner = None
        if len(self._chunks[0]) < frame_len:
            # Same allocator choice as for tensors (see codec._FrameDecoder._array); torch is
            # imported only for such large frames (serialization.limits says why it is lazy).
            if frame_len >= _TORCH_ALLOC_MIN:
                import torch

                owner = torch.empty(frame_len, dtype=torch.uint8).numpy()
            else:
                owner = np.empty(frame_len, np.uint8)
        frame = self._take(frame_len, owner)
        self._frame = None
        return _decode_frame(frame, body_len, payload_start, self._limits, owner)
