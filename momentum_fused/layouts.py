"""Dtype layouts: how params and optimizer state are stored. One explicit table; anything else raises.

| layout        | params (and grads)        | elementwise state | extra state         | rounding of every write |
|---------------|---------------------------|-------------------|---------------------|-------------------------|
| ``native``    | fp32, fp64, bf16 or fp16  | the param dtype   | -                   | round-to-nearest-even   |
| ``bf16_state``| fp32                      | bf16              | -                   | round-to-nearest-even   |
| ``master``    | bf16 or fp16              | fp32              | ``master`` (fp32)   | RNE (param from master) |
| ``bf16_sr``   | bf16                      | bf16              | -                   | stochastic rounding     |
| ``master16``  | bf16                      | fp32              | ``master_lo`` (int16)| to nearest, ties away   |
| ``int8_state``| fp32                      | 8-bit block codes | ``<name>_scale``    | nearest code (state)    |
| ``master16_int8``| bf16                   | 8-bit block codes | both of the above   | both of the above       |
| ``int8_sr``   | fp32                      | 8-bit block codes | ``<name>_scale``    | stochastic code (state) |
| ``master16_int8_sr``| bf16                | 8-bit block codes | as master16_int8    | master16; stochastic code |

The update math is always fp32 (fp64 for fp64 storage). With ``master`` the rule reads the param value
from the fp32 master copy (created from the param on the first step), writes the master, and writes the
param as the master rounded to nearest even, in the same pass. With ``bf16_sr`` every bf16 write (param
and state) rounds stochastically: the fp32 bit pattern ``u`` plus 16 random bits ``r``, truncated,
``(u + r) >> 16``, rounds up with probability equal to the dropped fraction: unbiased in expectation.
Non-finite values round to nearest.

With ``master16`` the fp32 master is not
stored: the bf16 param holds its high half rounded to nearest with ties away from zero and
``state["master_lo"]`` (int16) its low 16 bits, so that ``master16_decode(param, master_lo)`` rebuilds the
master exactly (finite values and infinities; a NaN decodes to a NaN). On the fp32 bit pattern ``u``:

    encode: param = (u + 0x8000) >> 16            remainder = u & 0xFFFF
    decode: u = ((param - (remainder >> 15)) << 16) | remainder      (16-bit halves, unsigned)

Round-to-nearest-even cannot be inverted from the low 16 bits: at a tie (remainder 0x8000) RNE goes up
from an odd high half and down from an even one, so an even param with remainder 0x8000 has two fp32
preimages. Ties away from zero always go up in magnitude, so the remainder's top bit says which way.

The random bits come from a counter-based hash, so a run is reproducible for a given seed and every
backend gives the same bits where its fp32 math agrees (written once per language: here in torch,
``triton_kernels/kernels.py``, ``csrc/storage.h``):

    lowbias32(x) = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16  (uint32)
    key   = sr_key(seed, step, tensor)                      one uint32 per tensor and step (host)
    key   = lowbias32(key ^ h(offsets))                      a DTensor shard not at the origin (below)
    key_b = key + b * 0x9E3779B9                            b = 0 for the param, 1 + j for state j
    r     = lowbias32(lo32(i) ^ key_b ^ lo32(hi32(i) * 0x85EBCA6B)) & 0xFFFF    i = element index (int64)

``seed`` above 2^32 - 1 is folded to 32 bits with its higher words hashed in (s = lo32(seed), then for each
higher 32-bit word w: s = lowbias32(s ^ lowbias32(w) ^ 0x9E3779B9); since 2026-12-06, when seeds that differed
only above bit 31 drew the same bits), ``step`` counts the optimizer's applied steps per param group (the
group's ``sr_step``, saved in the state_dict), ``tensor`` is the param's position in its group plus
``group index << 20``. A DTensor's local shard is indexed from 0, so shards would draw the same bits at the same local index: a shard whose global
offsets (o_0, o_1, ...) are not all 0 mixes them in, h = 0, then for each o: h = lowbias32(lowbias32(h ^
lo32(o)) ^ hi32(o)). Replicated params and the shard at the origin keep the plain key (replicas round alike).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed as _dist  # (imports nothing of this package)

__all__ = ["Layout", "LAYOUTS", "BASE_KERNEL_LAYOUTS", "get_layout", "lowbias32", "sr_key", "sr_round_bf16", "rne_bf16",
           "master16_encode", "master16_decode", "int8_table", "int8_encode", "int8_decode"]

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
HI_MULT = 0x85EBCA6B


@dataclass(frozen=True)
class Layout:
    name: str
    param_dtypes: tuple  # allowed param (and grad) dtypes
    state_dtype: torch.dtype | None  # None: the param dtype
    master: bool = False  # an fp32 master copy in state["master"]
    stochastic: bool = False  # stochastic rounding of every bf16 write (bf16_sr) or 8-bit code (int8 layouts)
    remainder: bool = False  # master16: the master's low 16 bits in state["master_lo"] (int16)
    int8: bool = False  # int8_state: the rule's state as 8-bit block codes + fp32 scales (int8_quantized)

    @property
    def reduced_state(self) -> bool:
        """The rule's state stored below fp32 precision: 8-bit codes, or a 16-bit state dtype on any param (not
        ``native``, whose state is the param's dtype, as torch.optim keeps it)."""
        return self.int8 or self.state_dtype in (torch.bfloat16, torch.float16)

    @property
    def by_element_index(self) -> bool:
        """Whether the stored values depend on an element's index in the param's row-major order (int8 blocks of
        256 consecutive elements, stochastic rounding bits hashed from the index): a kernel then needs the tensors
        in that order. The other layouts are elementwise: a dense non-contiguous param (channels_last) whose
        gradient and state have its strides steps in memory order (backends.contiguous_lists)."""
        return self.int8 or self.stochastic

    @property
    def extra_keys(self) -> tuple:
        """The state keys the layout adds after the rule's state tensors (in a bucket's state tuples)."""
        return (MASTER_KEY,) if self.master else (REMAINDER_KEY,) if self.remainder else ()

    def dtype_of(self, key: str, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype of state ``key`` (a rule state or one of ``extra_keys``) for a param of ``param_dtype``."""
        if key == MASTER_KEY and self.master:
            return torch.float32
        if key == REMAINDER_KEY and self.remainder:
            return torch.int16
        return self.state_dtype_for(param_dtype)

    def state_dtype_for(self, param_dtype: torch.dtype) -> torch.dtype:
        return param_dtype if self.state_dtype is None else self.state_dtype

    def describe(self) -> str:
        p = "/".join(str(d).replace("torch.", "") for d in self.param_dtypes)
        s = "param dtype" if self.state_dtype is None else str(self.state_dtype).replace("torch.", "")
        extra = (", fp32 master copy" if self.master else "") + (", stochastic rounding" if self.stochastic else "") \
            + (", fp32 master as param + int16 remainder" if self.remainder else "") \
            + (", 8-bit block codes for tensors of >= 4096 elements, a multiple of 256" if self.int8 else "")
        return f"{self.name!r} (params {p}, state {s}{extra})"


# The param dtypes of the compiled kernels, in the order of their codes (enum Dtype in csrc/generated/tables.h).
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# The dtype layouts, in the order of their codes (enum Layout in csrc/generated/tables.h, the backends' codes).
# Which of them a backend implements is its own list (``Backend.layouts``); the reference backend runs all.
LAYOUTS = {
    "native": Layout("native", (torch.float32, torch.float64, torch.bfloat16, torch.float16), None),
    "bf16_state": Layout("bf16_state", (torch.float32,), torch.bfloat16),
    "master": Layout("master", (torch.bfloat16, torch.float16), torch.float32, master=True),
    "bf16_sr": Layout("bf16_sr", (torch.bfloat16,), torch.bfloat16, stochastic=True),
    "master16": Layout("master16", (torch.bfloat16,), torch.float32, remainder=True),
    "int8_state": Layout("int8_state", (torch.float32,), torch.float32, int8=True),
    "master16_int8": Layout("master16_int8", (torch.bfloat16,), torch.float32, remainder=True, int8=True),
    # the int8 layouts with the state's codes rounded stochastically (int8_encode with a key): same storage
    "int8_sr": Layout("int8_sr", (torch.float32,), torch.float32, stochastic=True, int8=True),
    "master16_int8_sr": Layout("master16_int8_sr", (torch.bfloat16,), torch.float32, stochastic=True, remainder=True,
                               int8=True),
}
# The layouts of the first kernels (every compiled backend implements these four).
BASE_KERNEL_LAYOUTS = ("native", "bf16_state", "master", "bf16_sr")
NATIVE = LAYOUTS["native"]
MASTER_KEY = "master"
REMAINDER_KEY = "master_lo"


_ELEM_BYTES = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2, torch.float16: 2}


def roofline_bytes(n_state: int, param_dtype=torch.float32, grad_dtype=None, state_dtype=None,
                   layout: str = "native") -> float:
    """Bytes read + written per element by one fused pass over a param with ``n_state`` elementwise state
    tensors (docs/algorithms.md §9): param read + write, grad read, each state read + write; under the
    ``master`` layout the fp32 master copy is read and written and the param only written; ``master16`` reads
    and writes the int16 remainder; ``int8_state`` counts a quantized tensor (codes and block scales, a float)."""
    lay = get_layout(layout)
    p = _ELEM_BYTES[param_dtype]
    g = _ELEM_BYTES[grad_dtype or param_dtype]
    s = _ELEM_BYTES[state_dtype or lay.state_dtype_for(param_dtype)]
    if lay.int8:  # a quantized tensor: 1-byte codes and an fp32 scale per INT8_BLOCK elements
        s_rw = n_state * 2 * (1 + 4 / INT8_BLOCK)
    else:
        s_rw = 2 * s * n_state
    if lay.master:
        return p + 2 * 4 + g + s_rw
    if lay.remainder:  # the param and the remainder, read and written
        return 2 * p + 2 * 2 + g + s_rw
    return 2 * p + g + s_rw


def supported() -> str:
    return "; ".join(lay.describe() for lay in LAYOUTS.values())


def get_layout(name) -> Layout:
    if name is None:
        return NATIVE
    if isinstance(name, Layout):
        return name
    if not isinstance(name, str) or name not in LAYOUTS:
        raise ValueError(f"unknown dtype layout {name!r}; supported layouts: {supported()}")
    return LAYOUTS[name]


# ------------------------------------------------------------------------------ the hash (host ints)
def lowbias32(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def sr_key(seed: int, step: int, tensor: int, shard: tuple = ()) -> int:
    """The per-(tensor, step) key of the stochastic rounding (a uint32 as a Python int). ``shard``: the global
    offsets of a DTensor's local shard (``distributed.shard_offsets``); a shard that does not start at the origin
    mixes them into the key, so that no two shards of a tensor draw the same bits."""
    return sr_tensor_key(sr_step_key(seed, step), tensor, shard)


def sr_step_key(seed: int, step: int) -> int:
    """``sr_key``'s part shared by every tensor of a group's step (computed once a step, not once a tensor)."""
    s, hi = seed & M32, seed >> 32
    while hi:  # (a seed of more than 32 bits: its higher words hashed in; seeds below 2^32 are as before)
        s, hi = lowbias32(s ^ lowbias32(hi & M32) ^ 0x9E3779B9), hi >> 32
    return lowbias32(lowbias32(s) ^ (step & M32))


def sr_tensor_key(step_key: int, tensor: int, shard: tuple = ()) -> int:
    """``sr_key`` from ``sr_step_key``'s value."""
    key = lowbias32(step_key ^ (tensor & M32))
    if any(shard):
        h = 0
        for o in shard:
            h = lowbias32(lowbias32(h ^ (o & M32)) ^ ((o >> 32) & M32))
        key = lowbias32(key ^ h)
    return key


# ------------------------------------------------------------------- the rounding (torch, reference)
def _lowbias32_t(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor holding uint32 values (products wrap in int64; the low 32 bits are
    exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def sr_bits(numel: int, key: int, buffer: int, device=None, start: int = 0) -> torch.Tensor:
    """The 16 random bits r of every element index start .. start+numel-1 (int64 tensor)."""
    i = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    kb = (key + buffer * GOLDEN) & M32
    h = (i & M32) ^ kb ^ (((i >> 32) * HI_MULT) & M32)
    return _lowbias32_t(h) & 0xFFFF


def _rne_bf16_bits(u: torch.Tensor) -> torch.Tensor:
    """fp32 bits (int64 holding uint32) -> bf16 bits, round to nearest even; NaN -> quiet NaN with the
    sign kept (as the CPU kernels; the CUDA and Triton stores give the hardware's canonical NaN, torch's
    vectorized conversion 0xFFFF: a NaN's sign and payload are unspecified, docs/csrc.md)."""
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return torch.where(nan, (u >> 16) | 0x40, (u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def _bits_to_bf16(bits: torch.Tensor) -> torch.Tensor:
    return (bits - ((bits & 0x8000) << 1)).to(torch.int16).view(torch.bfloat16)


def rne_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, round to nearest even (NaN handled as by the kernels)."""
    x = x.float().contiguous()
    return _bits_to_bf16(_rne_bf16_bits(x.view(torch.int32).to(torch.int64) & M32))


def sr_round_bf16(x: torch.Tensor, key: int, buffer: int) -> torch.Tensor:
    """fp32 tensor -> bf16 with the stochastic rounding above (element index = flat position in x)."""
    x = x.float().contiguous()
    u = x.view(torch.int32).to(torch.int64) & M32
    r = sr_bits(x.numel(), key, buffer, x.device).view(x.shape)
    up = ((u + r) >> 16) & 0xFFFF
    finite = (u & 0x7F800000) != 0x7F800000
    return _bits_to_bf16(torch.where(finite, up, _rne_bf16_bits(u)))


# The torch codecs below (master16, int8 codes) run over flat slices of CODEC_CHUNK elements, writing into their
# outputs: their int64 bit arithmetic takes ~25-45 bytes an element of temporaries, which grew with the largest
# tensor (a review measured 1.5 GB for one schedule-free eval() of a 33M-element master16 param, 1.3 GB to convert
# a checkpoint between layouts; 2026-12-07). Elementwise or per block: the results do not depend on the slicing.
CODEC_CHUNK = 1 << 20  # elements (a multiple of INT8_BLOCK)


def _slices(n: int, step: int):
    return ((i, min(i + step, n)) for i in range(0, n, step))


# ------------------------------------------------------------------- master16 (torch, reference)
@_dist.shardwise
def master16_encode(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 master -> (bf16 param, int16 remainder): the param is the master rounded to nearest with ties away
    from zero, the remainder the master's low 16 bits (two's-complement int16 of the unsigned half). A NaN
    gives a quiet NaN param (sign kept) and its low bits; every other value, infinities included, decodes
    back exactly."""
    x = master.float().contiguous()
    hi = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    lo = torch.empty(x.shape, dtype=torch.int16, device=x.device)
    xf, hf, lf = x.view(-1), hi.view(-1), lo.view(-1)
    for i, j in _slices(x.numel(), CODEC_CHUNK):
        u = xf[i:j].view(torch.int32).to(torch.int64) & M32
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        h = torch.where(nan, (u >> 16) | 0x40, (u + 0x8000) >> 16) & 0xFFFF
        low = u & 0xFFFF
        hf[i:j] = _bits_to_bf16(h)
        lf[i:j] = (low - ((low & 0x8000) << 1)).to(torch.int16)
    return hi, lo


@_dist.shardwise
def master16_decode(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """(bf16 param, int16 remainder) -> the fp32 master (the inverse of ``master16_encode``). A pair that would
    decode to a NaN while the param is not NaN is one no encode makes (a +-0 or +-inf written into the param
    between steps, beside a stale remainder: the borrow of a zero param wraps to a NaN's exponent); it decodes
    to the param itself, as the ``master`` layout restarts a written element from its param."""
    pf, rf = param.contiguous().view(-1).view(torch.int16), remainder.contiguous().view(-1)
    out = torch.empty(pf.shape, dtype=torch.float32, device=pf.device)
    for i, j in _slices(pf.numel(), CODEC_CHUNK):
        hi = pf[i:j].to(torch.int64) & 0xFFFF
        lo = rf[i:j].to(torch.int64) & 0xFFFF
        u = (((hi - (lo >> 15)) & 0xFFFF) << 16) | lo
        stale = ((u & 0x7FFFFFFF) > 0x7F800000) & ((hi & 0x7FFF) <= 0x7F80)
        u = torch.where(stale, hi << 16, u)
        out[i:j] = (u - ((u & 0x80000000) << 1)).to(torch.int32).view(torch.float32)
    return out.view(param.shape)


# ----------------------------------------------- int8 block codes (torch, the spec of layout int8_state)
# The code map of the int8_state layout (docs/algorithms.md §11; chosen by bench/int8_codemaps.py): the reference
# backend runs these functions; every backend gives the same codes.
INT8_BLOCK = 256  # elements per fp32 scale
INT8_MIN_NUMEL = 4096  # smaller tensors (or sizes not a multiple of the block) keep fp32 state


def int8_table(signed: bool) -> torch.Tensor:
    """The decoded values of the codes, ascending, fp32. Signed (m, momentum buffers; int8 codes -127..127, table
    index = code + 127): sign(c) c^2 / 127^2. Unsigned (second moments; uint8 codes 0..255, index = code):
    c^4 / 255^4. Each value is the float64 quotient of the exact integers, rounded to fp32."""
    if signed:
        c = torch.arange(-127, 128, dtype=torch.float64)
        return (c.sign() * c * c / 16129.0).float()
    c = torch.arange(256, dtype=torch.float64)
    return (c ** 4 / 255.0 ** 4).float()


# The encode works in the map's integer space: a block's values are multiplied by k = K / scale, so that code c
# sits at c^2 (signed, K = 127^2) or about c^4 (unsigned, K = 255^4 rounded to fp32, 255^4 - 1), and compared with
# the midpoints between neighbouring codes there, which fp32 holds exactly (signed) or with one rounding
# (unsigned): no per-element division and no table in any backend (docs/algorithms.md §11 has the reasons).
INT8_K_SIGNED = 16129.0  # 127^2
INT8_K_UNSIGNED = 4228250624.0  # 255^4 = 4228250625 rounded to fp32
INT8_TINY = 2.0 ** -64  # a block whose scale is below this (and > 0) is first multiplied by 2^64 (exact)


def int8_midpoints(signed: bool) -> torch.Tensor:
    """The encode's decision points in the integer space, fp32, ascending: between the magnitude codes j - 1 and j
    (j = 1 .. 127 signed, 1 .. 255 unsigned), ((j - 1)^2 + j^2) / 2 = j (j - 1) + 1/2 (exact in fp32) or
    ((j - 1)^4 + j^4) / 2 rounded once to fp32."""
    j = torch.arange(1, 128 if signed else 256, dtype=torch.float64)
    return (j * (j - 1) + 0.5 if signed else ((j - 1) ** 4 + j ** 4) / 2).float()


def int8_factors(scale: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block scale (fp32): (u, k) with y' = (x u) k the integer-space value (two fp32 products). u = 2^64 for
    0 < scale < 2^-64, else 1; k = K / (scale u) as an fp32 division (0 for a zero scale; NaN for a NaN scale, 0
    for an infinite one)."""
    s = scale.float()
    u = torch.where((s > 0) & (s < INT8_TINY), torch.full_like(s, 2.0 ** 64), torch.ones_like(s))
    big_k = torch.full_like(s, INT8_K_SIGNED if signed else INT8_K_UNSIGNED)
    k = torch.where(s == 0, torch.zeros_like(s), big_k.div(s * u))  # tensor / tensor: IEEE fp32 division
    return u, k


def int8_codes_of(y: torch.Tensor, signed: bool) -> torch.Tensor:
    """Integer-space values y' (fp32) -> their codes (int64): the magnitude code is the count of
    ``int8_midpoints`` m with not(|y'| <= m) (a value on a midpoint takes the smaller magnitude; NaN the top code),
    negated where y' < 0 (signed); an unsigned y' <= 0 has code 0, and an unsigned y' > 0 at least code 1 (the
    floor: a positive second moment never decodes to 0, which would make Adam's step m / eps; since
    2026-12-06)."""
    mids = int8_midpoints(signed).to(y.device)
    a = y.abs() if signed else y
    c = torch.bucketize(a, mids, right=False)  # the count of midpoints strictly below a
    c = torch.where(torch.isnan(a), torch.full_like(c, mids.numel()), c)
    return torch.where(y < 0, -c, c) if signed else torch.where(y > 0, c.clamp(min=1), c)


def int8_codes_sr_of(y: torch.Tensor, signed: bool, r: torch.Tensor) -> torch.Tensor:
    """Integer-space values y' (fp32) and 16-bit random integers r (int64, y's shape) -> codes (int64), rounded
    stochastically between the two codes around |y'| (layouts int8_sr, master16_int8_sr). In the integer space
    code c sits at p(c) = c^2 (signed) or c^4 (unsigned). With a = |y'| (unsigned: max(y', 0)), f the largest
    code with p(f) <= a (the top code when a is at or above it), d = a - p(f) and w = p(f + 1) - p(f): the
    magnitude code is f + 1 when r w < d 2^16 (exact real numbers; f + 1 with probability d / w to 2^-16, so the
    decoded value is unbiased), else f; the top code stays; a NaN takes the top code; the sign is y' < 0's.
    Unsigned, a y' > 0 below p(1) takes code 1 always (the floor of ``int8_codes_of``: unbiased codes would
    decode such a second moment to 0 most of the time, and Adam's step there to m / eps). Every quantity is an
    integer or an fp32 value below 2^33, so float64 computes the comparison exactly."""
    top = 127 if signed else 255
    a = (y.abs() if signed else torch.where((y > 0) | torch.isnan(y), y, torch.zeros_like(y))).double()
    pw = (lambda c: c * c) if signed else (lambda c: (c * c) * (c * c))
    f = (a.sqrt() if signed else a.sqrt().sqrt()).floor().clamp(0, top)
    f = torch.where(pw(f) > a, f - 1, f)  # a float64 root off by one near a power: corrected exactly
    f = torch.where((f < top) & (pw(f + 1) <= a), f + 1, f)
    up = (f < top) & (r.double() * (pw(f + 1) - pw(f)) < (a - pw(f)) * 65536.0)
    if not signed:
        up = up | ((f == 0) & (a > 0))
    c = torch.where(torch.isnan(a), torch.full_like(f, top), f + up.double()).long()
    return torch.where(y < 0, -c, c) if signed else c


def int8_encode(x: torch.Tensor, signed: bool, key: int | None = None,
                buffer: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tensor (numel a multiple of INT8_BLOCK) -> (codes shaped as x: int8 if signed else uint8, fp32 scales
    shaped ``int8_scale_shape(x)``). Per block of 256 consecutive elements (x flattened): scale = max |x| (NaN if one is);
    the codes of y' = (x u) k (``int8_factors``): to the nearest code (``int8_codes_of``), or with a ``key``
    stochastically (``int8_codes_sr_of``) with the bits ``sr_bits(numel, key, buffer)`` of each element's flat
    index (the layouts int8_sr and master16_int8_sr: buffer 1 + j for the rule's state j, as bf16_sr's)."""
    b = x.float().contiguous().view(-1, INT8_BLOCK)
    codes = torch.empty(b.shape, dtype=torch.int8 if signed else torch.uint8, device=b.device)
    scale = torch.empty(b.shape[0], dtype=torch.float32, device=b.device)
    for r0, r1 in _slices(b.shape[0], CODEC_CHUNK // INT8_BLOCK):  # (whole blocks: the same codes)
        bc = b[r0:r1]
        sc = bc.abs().amax(dim=1)
        u, k = int8_factors(sc, signed)
        y = (bc * u[:, None]) * k[:, None]
        c = int8_codes_of(y, signed) if key is None else \
            int8_codes_sr_of(y, signed, sr_bits(bc.numel(), key, buffer, b.device, r0 * INT8_BLOCK).view(bc.shape))
        codes[r0:r1] = c
        scale[r0:r1] = sc
    return codes.view(x.shape), scale.view(int8_scale_shape(x))


def int8_decode(codes: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """(codes, fp32 scales of any shape, in block order) -> fp32 values shaped as codes: table value times the
    block's scale (fp32 product)."""
    table = int8_table(signed).to(codes.device)
    cb, sb = codes.contiguous().view(-1, INT8_BLOCK), scale.reshape(-1, 1)
    if sb.shape[0] != cb.shape[0]:
        raise ValueError(f"int8_decode: {sb.shape[0]} scales for {cb.shape[0]} blocks of {INT8_BLOCK} codes")
    out = torch.empty(cb.shape, dtype=torch.promote_types(torch.float32, sb.dtype), device=cb.device)
    for r0, r1 in _slices(cb.shape[0], CODEC_CHUNK // INT8_BLOCK):
        idx = cb[r0:r1].long()
        idx = idx.clamp_min(-127) + 127 if signed else idx  # (-128, outside the map: as -127 on every backend)
        torch.mul(table[idx], sb[r0:r1], out=out[r0:r1])
    return out.view(codes.shape)


# Rule states that are never negative: unsigned codes (uint8, the c^4 map); every other state is signed (int8).
INT8_UNSIGNED = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg"})
INT8_SCALE_SUFFIX = "_scale"  # state[name + "_scale"]: the fp32 block scales of state[name]
# state_dict()[...][name] = {"codes": codes}: the 8-bit codes of state[name] in a checkpoint, one level down (not
# as `name`'s tensor, which torch.optim, a native optimizer or a DCP load into one would take as the values;
# under `name`, so that torch.distributed.checkpoint's flatten_optimizer_state_dict, which rebuilds a state from
# the live keys, finds them: docs/layouts.md). Checkpoints of 2026-12-05 and 12-06 hold them as name + "_codes".
INT8_CODES_KEY = "codes"
INT8_CODES_SUFFIX = "_codes"


def remainder_bytes(lo: torch.Tensor) -> torch.Tensor:
    """A master remainder (int16, the param's shape) as its checkpoint form: uint8 of shape (*shape, 2), the two
    bytes of each remainder, low byte first on little-endian hosts (a view, no copy; a DTensor stays one, placed as the param).
    Collectives gather it where they gather no int16 (NCCL, gloo): a full state dict of FSDP2 params."""
    return _dist.view_placed(lo, lambda t: t.unsqueeze(-1).view(torch.uint8), (*lo.shape, 2))


def remainder_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """The inverse of ``remainder_bytes`` (a view where ``b``'s last dim is contiguous)."""
    return _dist.view_placed(b, lambda t: t.contiguous().view(torch.int16).squeeze(-1), tuple(b.shape[:-1]))


def is_remainder_bytes(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() >= 1 and t.shape[-1] == 2


def int8_quantized(p: torch.Tensor) -> bool:
    """Whether the int8 layouts store ``p``'s state as codes (else fp32): at least INT8_MIN_NUMEL elements, a
    multiple of INT8_BLOCK. A DTensor (FSDP2) param also needs its blocks inside its shards: placements Shard(0) or
    Replicate only, at least 2 dims, and rows (shape[0] slices) of a whole number of blocks; its blocks are then
    those of the same plain tensor, and the decision is the global tensor's, never a shard's."""
    n = p.numel()
    if n < INT8_MIN_NUMEL or n % INT8_BLOCK:
        return False
    if _dist.is_dtensor(p):
        row = n // p.shape[0] if p.dim() >= 2 and p.shape[0] else 0
        return row > 0 and row % INT8_BLOCK == 0 and all(
            pl.is_replicate() or (pl.is_shard() and pl.dim == 0) for pl in p.placements)
    return True


def int8_scale_shape(p: torch.Tensor) -> tuple:
    """The shape of the block scales of a quantized ``p``: (shape[0], blocks per row) where its rows (shape[0]
    slices) hold whole blocks, as every quantized DTensor's do (a DTensor placed like the param, so that each
    shard's scales are those of its own rows); else (numel / INT8_BLOCK,). One shape for a plain tensor and a
    DTensor of the same global shape, so that DCP reshards a checkpoint between FSDP2 and one process."""
    n = p.numel() // INT8_BLOCK
    rows = p.shape[0] if p.dim() >= 2 else 0
    return (rows, n // rows) if rows and (p.numel() // rows) % INT8_BLOCK == 0 else (n,)


def int8_code_dtype(name: str) -> torch.dtype:
    return torch.uint8 if name in INT8_UNSIGNED else torch.int8
