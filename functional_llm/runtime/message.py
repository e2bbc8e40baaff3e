"""The tensor-parallel step message: what rank 0 broadcasts to the workers each step, without
pickling. A fixed-length int64 header (kind, payload bytes, has-feed flag, then per field of
HostInputs and the feed's dst/index arrays: dtype code, ndim, dims; an int field such as max_q
is carried in the header itself), then one flat uint8 payload holding the arrays back to back,
each padded to 8 bytes."""
from __future__ import annotations

import attrs
import numpy as np

from functional_llm.runtime.runner import Feed
from functional_llm.runtime.staging import HostInputs

STEP, STOP = 1, 2
_HOST_FIELDS = tuple(f.name for f in attrs.fields(HostInputs))
_FIELDS = _HOST_FIELDS + ("feed_dst", "feed_index")
HEADER_LEN = 3 + 4 * len(_FIELDS)        # kind, payload bytes, has feed; per field 4 slots
_DTYPES = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.float64))
_CODE = {dt: i + 1 for i, dt in enumerate(_DTYPES)}   # 0: an int carried in the header
_NO_FEED = np.zeros(0, dtype=np.int64)
_ZEROS = np.zeros(8, dtype=np.uint8)     # padding: an n-byte array is followed by -n % 8 bytes


def encode(host: HostInputs, feed: Feed | None) -> tuple[np.ndarray, np.ndarray]:
    """(header [HEADER_LEN] int64, payload uint8) of one step."""
    header = [STEP, 0, int(feed is not None)]
    values = [getattr(host, n) for n in _HOST_FIELDS]
    values += [feed.dst, feed.index] if feed is not None else [_NO_FEED, _NO_FEED]
    parts = []   # each array's bytes, then its padding
    for value in values:
        if isinstance(value, (int, np.integer)):
            header += (0, 0, int(value), 0)
            continue
        a = np.ascontiguousarray(value)
        assert a.ndim <= 2, "the header holds two dimensions per array"
        shape = a.shape + (0,) * (2 - a.ndim)
        header += (_CODE[a.dtype], a.ndim, *shape)
        parts += [a.reshape(-1).view(np.uint8), _ZEROS[:-a.nbytes % 8]]
    payload = np.concatenate(parts)   # never empty: cu_q holds B + 1 >= 1 entries
    header[1] = payload.size
    return np.array(header, dtype=np.int64), payload


def decode(header: np.ndarray, payload: np.ndarray) -> tuple[HostInputs, np.ndarray | None,
                                                              np.ndarray | None]:
    """The inverse of encode: (host inputs, feed dst, feed index); the arrays are views of
    payload, and dst/index are None when the step had no feed."""
    h = header.tolist()
    values, off = [], 0
    for i in range(3, HEADER_LEN, 4):
        code, ndim, d0, d1 = h[i:i + 4]
        if code == 0:
            values.append(d0)
            continue
        dt = _DTYPES[code - 1]
        nbytes = d0 * (d1 if ndim == 2 else 1) * dt.itemsize
        values.append(payload[off:off + nbytes].view(dt).reshape((d0, d1)[:ndim]))
        off += nbytes + -nbytes % 8
    host = HostInputs(*values[:len(_HOST_FIELDS)])
    return (host, values[-2], values[-1]) if h[2] else (host, None, None)
