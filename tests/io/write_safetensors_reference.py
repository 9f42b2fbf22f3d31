#!/usr/bin/env python3
"""Independent safetensors oracle for the C++ reader/writer (tests/io/test_safetensors_python.cpp).

Uses only torch, struct and json (the `safetensors` package is not installed), following the
format of https://github.com/huggingface/safetensors: u64 little-endian header length, JSON
header, data buffer.

  --out FILE          write reference_tensors() and METADATA to FILE
  --values FILE       write their exact values as JSON: name -> {dtype, shape, bits}, where bits
                      are the little-endian element bit patterns as unsigned integers
  --check FILE        parse FILE and exit 1 unless it holds exactly reference_tensors() (bitwise)
                      and METADATA, with a header padded to 8 bytes and tensors tiling the buffer
"""
import argparse
import json
import struct
import sys

import torch

METADATA = {"format": "pt", "producer": "write_safetensors_reference.py"}

# dtype -> (safetensors name, same-size integer dtype used to reach the raw bits)
DTYPES = {
    torch.float32: ("F32", torch.int32),
    torch.float16: ("F16", torch.int16),
    torch.bfloat16: ("BF16", torch.int16),
    torch.int64: ("I64", torch.int64),
}
BY_NAME = {name: (dtype, int_dtype) for dtype, (name, int_dtype) in DTYPES.items()}


def reference_tensors():
    g = torch.Generator().manual_seed(1234)
    return [
        ("arange_f32", torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.25 - 1.0),
        ("randn_f16", torch.randn(2, 3, generator=g).to(torch.float16)),
        ("randn_bf16", torch.randn(5, generator=g).to(torch.bfloat16)),
        ("big_i64", torch.arange(-3, 3, dtype=torch.int64) * (2**40 + 7)),
        ("scalar_f32", torch.tensor(3.14159, dtype=torch.float32)),
        ("empty_f32", torch.zeros(0, 4, dtype=torch.float32)),
    ]


def bits(t):
    _, int_dtype = DTYPES[t.dtype]
    mask = (1 << (8 * t.element_size())) - 1
    return [v & mask for v in t.contiguous().view(int_dtype).flatten().tolist()]


def raw_bytes(t):
    _, int_dtype = DTYPES[t.dtype]
    return t.contiguous().view(int_dtype).numpy().tobytes()


def write(path, tensors, metadata):
    header = {"__metadata__": metadata}
    data = b""
    for name, t in tensors:
        b = raw_bytes(t)
        header[name] = {
            "dtype": DTYPES[t.dtype][0],
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(b)],
        }
        data += b
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def read(path):
    with open(path, "rb") as f:
        content = f.read()
    (n,) = struct.unpack("<Q", content[:8])
    assert n % 8 == 0, f"header length {n} is not a multiple of 8"
    header = json.loads(content[8 : 8 + n])
    data = content[8 + n :]
    metadata = header.pop("__metadata__", {})
    tensors, end = [], 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, stop = e["data_offsets"]
        assert begin == end, f"{name}: data_offsets {e['data_offsets']} do not follow {end}"
        end = stop
        dtype, int_dtype = BY_NAME[e["dtype"]]
        chunk = bytearray(data[begin:stop])
        if chunk:
            flat = torch.frombuffer(chunk, dtype=int_dtype)
        else:
            flat = torch.zeros(0, dtype=int_dtype)
        tensors.append((name, flat.view(dtype).reshape(e["shape"])))
    assert end == len(data), f"data buffer has {len(data)} bytes, tensors cover {end}"
    return tensors, metadata


def check(path):
    got, metadata = read(path)
    got = dict(got)
    errors = []
    if metadata != METADATA:
        errors.append(f"metadata {metadata} != {METADATA}")
    want = dict(reference_tensors())
    if sorted(got) != sorted(want):
        errors.append(f"tensor names {sorted(got)} != {sorted(want)}")
    for name in sorted(set(got) & set(want)):
        g, w = got[name], want[name]
        if g.dtype != w.dtype or g.shape != w.shape or bits(g) != bits(w):
            errors.append(f"{name}: got {g.dtype} {list(g.shape)} {g.flatten().tolist()}, "
                          f"want {w.dtype} {list(w.shape)} {w.flatten().tolist()}")
    for e in errors:
        print(f"{path}: {e}", file=sys.stderr)
    return 1 if errors else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--values")
    p.add_argument("--check")
    args = p.parse_args()
    if args.out:
        write(args.out, reference_tensors(), METADATA)
    if args.values:
        values = {name: {"dtype": DTYPES[t.dtype][0], "shape": list(t.shape), "bits": bits(t)}
                  for name, t in reference_tensors()}
        with open(args.values, "w") as f:
            json.dump({"tensors": values, "metadata": METADATA}, f)
    if args.check:
        return check(args.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
