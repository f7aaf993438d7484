"""Packed storage of ternary weights, lossless.

Two formats, chosen in config:

- ``"2bit"``: four weights per byte, 2 bits each (the layout of bitnet.cpp's I2_S and HF
  transformers' packed BitLinear, here row-major): digit ``d = t + 1`` in {0, 1, 2}; byte
  ``d0 << 6 | d1 << 4 | d2 << 2 | d3``; the last byte padded with zeros (digit 1); code 3 is
  invalid. 2 bits per weight, and unpacking is shifts and masks.
- ``"base3"``: five weights per byte (3^5 = 243 <= 256), 1.6 bits per weight, the packing of
  ``phases.compression.ternary`` (one implementation shared with phase 8's ternary codec).

``pack`` takes int codes in {-1, 0, 1} of any shape (read row-major); ``unpack`` needs the count.
"""

from __future__ import annotations

import torch

from phases.compression.ternary import check_packed, pack_trits, unpack_trits

__all__ = ["FORMATS", "bits_per_weight", "check", "decode_table", "pack", "unpack", "packed_bytes"]

FORMATS = ("2bit", "base3")
_PER_BYTE = {"2bit": 4, "base3": 5}
_SHIFTS = torch.tensor([6, 4, 2, 0], dtype=torch.int32)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")


def bits_per_weight(fmt: str) -> float:
    """Bits per weight of the codes alone (2.0 or 1.6), before padding and scales."""
    _check_format(fmt)
    return 8.0 / _PER_BYTE[fmt]


def weights_per_byte(fmt: str) -> int:
    """How many ternary weights one byte holds (4 or 5)."""
    _check_format(fmt)
    return _PER_BYTE[fmt]


def packed_bytes(count: int, fmt: str) -> int:
    """Bytes that ``count`` packed weights take (the last byte padded)."""
    _check_format(fmt)
    return -(-count // _PER_BYTE[fmt])


def pack(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Ternary codes (any shape, read row-major) as a (packed_bytes(n),) uint8 tensor.

    Raises:
        ValueError: an unknown format or a value outside {-1, 0, 1}.
    """
    _check_format(fmt)
    if fmt == "base3":
        return pack_trits(codes)
    flat = codes.detach().reshape(-1).cpu().to(torch.int32)
    if flat.numel() and (int(flat.min()) < -1 or int(flat.max()) > 1):
        raise ValueError(f"codes must be in {{-1, 0, 1}}, got values in [{int(flat.min())}, {int(flat.max())}]")
    pad = (-flat.numel()) % 4
    digits = torch.cat([flat + 1, torch.ones(pad, dtype=torch.int32)]).reshape(-1, 4)
    return (digits << _SHIFTS).sum(1).to(torch.uint8)


def check(packed: torch.Tensor, count: int, fmt: str) -> None:
    """Check that ``packed`` holds ``count`` valid codes in ``fmt``, with byte-sized temporaries
    only (no unpacked copy).

    Raises:
        ValueError: an unknown format, a byte count that does not fit ``count``, or an invalid
            code (3 in the 2-bit format, a byte >= 243 in base 3).
    """
    _check_format(fmt)
    if fmt == "base3":
        check_packed(packed, count)
        return
    need = packed_bytes(count, fmt)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"{count} codes need {need} uint8 bytes (1-D), got {packed.numel()} {packed.dtype} "
                         f"of shape {tuple(packed.shape)}")
    both = packed & (packed >> 1) & 0b01010101  # bit 2i set where field i (bits 2i, 2i+1) is 3
    if bool(both.any()):
        raise ValueError("code 3 is not a ternary value: the packed bytes are corrupt")


def unpack(packed: torch.Tensor, count: int, fmt: str) -> torch.Tensor:
    """Inverse of ``pack``: the first ``count`` codes as an int8 tensor (count,).

    Raises:
        ValueError: an unknown format, a byte count that does not fit ``count``, or an invalid
            code (3 in the 2-bit format, a byte >= 243 in base 3).
    """
    if fmt == "base3":
        return unpack_trits(packed, count)
    check(packed, count, fmt)
    digits = (packed.cpu().to(torch.int32)[:, None] >> _SHIFTS) & 3  # (bytes, 4)
    return (digits.reshape(-1)[:count] - 1).to(torch.int8)


def decode_table(fmt: str) -> torch.Tensor:
    """(256, weights per byte) float32: the codes every byte value holds, so that
    ``decode_table(fmt)[packed].reshape(-1)[:count]`` unpacks with one gather (invalid byte
    values decode to 0; ``unpack`` is the validating path)."""
    _check_format(fmt)
    per = _PER_BYTE[fmt]
    values = torch.arange(256, dtype=torch.int32)[:, None]
    if fmt == "2bit":
        digits = (values >> _SHIFTS) & 3
    else:
        digits = (values // torch.tensor([3 ** (per - 1 - i) for i in range(per)], dtype=torch.int32)) % 3
    table = (digits - 1).float()
    table[(digits == 3).any(1) if fmt == "2bit" else values[:, 0] >= 3 ** per] = 0.0
    return table
