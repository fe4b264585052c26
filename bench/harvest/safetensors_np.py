"""Minimal safetensors reading/writing with numpy, for the benchmark scripts (no extra packages)."""
import json
import struct

import numpy as np

_DTYPES = {"F32": np.float32, "I64": np.int64, "I32": np.int32, "F16": np.float16}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write(path, tensors):
    """tensors: dict name -> numpy array (F32/I64/I32/F16). Layout sorted by name."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        b = a.tobytes()
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read(path, names=None):
    """Returns dict name -> numpy array (BF16 is widened to float32)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or (names is not None and name not in names):
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        if info["dtype"] == "BF16":
            u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            a = u.view(np.float32)
        else:
            a = np.frombuffer(raw, dtype=_DTYPES[info["dtype"]])
        out[name] = a.reshape(info["shape"])
    return out
