"""Hadamard incoherence processing (QuIP#-style) of weight matrices, without padding.

Orders. A width n is supported when n = m * 2^k with a small order m this module can build
(:func:`hadamard_order`); widths that are not are reported (None / ValueError), never padded. The
Hadamard matrix of order n is H_n = H_m (x) H_{2^k}: H_{2^k} is Sylvester's, H[i, j] =
(-1)^popcount(i & j), and H_m comes from Paley's constructions over a finite field GF(q), q = p^e
(p an odd prime, e <= 3), with Jacobsthal matrix Q[i, j] = chi(x_i - x_j), chi the quadratic character:

- Paley I, q = 3 mod 4, order q + 1: H = I + [[0, 1^T], [-1, Q]]   (12 from q=11, 20, 44, 60, 344 from 7^3)
- Paley II, q = 1 mod 4, order 2 (q + 1): S = [[0, 1^T], [1, Q]],
  H = S (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]
  (28 from q=13, 36 from 17, 52 from 5^2, 100 from 7^2)

Paley I is tried first. m = 1 for powers of two; otherwise m is the smallest buildable 4 o 2^j
(o the odd part of n) up to MAX_SMALL_ORDER, 49 orders in all (:func:`small_orders`). No route
here to 4 o = 92, 116, 156, 172, 188, 236 (Williamson-type constructions would be needed); such a
width is still supported when 8 o or 16 o builds: Llama's 11008 = 172 * 64 uses 344 = 7^3 + 1.

Transform. With Ĥ = H_n / sqrt(n) (orthonormal), ``hadamard_transform(x, dim)`` computes Ĥ v for
every vector v along ``dim`` (``inverse=True``: Ĥ^T v) without an n x n matrix: the vector is viewed
as [m, 2^k] and gets one [m, m] matmul over the m axis and a Walsh-Hadamard butterfly over the 2^k
part, whose stages are radix-2^r (Sylvester blocks of <= 2^RADIX_BITS, one matmul each):
n (m + 2^r ceil(k / r)) multiply-adds per vector, O(n log n + n m). fp16/bf16 are computed in fp32
and rounded once at the end, fp32/fp64 in their own dtype (on CUDA an fp32 matmul follows torch's
float32 matmul precision: TF32, if a caller enables it, costs ~1e-3 relative).

Rotations. S = diag(signs(n, seed)) and R = Ĥ S (orthogonal: R R^T = I). For W [..., out, in]:

    rotate(W)    = W' = R_out W R_in^T = Ĥ_out S_out W S_in Ĥ_in^T      [..., out, in]
    unrotate(W') = R_out^T W' R_in     = S_out Ĥ_out^T W' Ĥ_in S_in

so a Linear y = W x runs in the rotated basis as y = R_out^T (W' (R_in x)):

    rotate_input(x)   = R_in x,       x [..., in]   (row layout: x S_in Ĥ_in^T)
    rotate_output(y') = R_out^T y',   y' [..., out] (row layout: y' Ĥ_out S_out)
    F.linear(x, W, b) = rotate_output(F.linear(rotate_input(x), W')) + b   (the bias stays unrotated)

A LoRA fit W' ~ Q' + B' A' in the rotated basis (B' [out, r], A' [r, in]) maps back exactly:
unrotate(Q' + B' A') = unrotate(Q') + B A with (B, A) = unrotate_adapter(B', A') =
(R_out^T B', A' R_in) = (S_out Ĥ_out^T B', A' Ĥ_in S_in); rotate_adapter is its inverse.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

# The dense factor costs m multiply-adds per element: past a few hundred the transform stops being
# cheap (and a width that would need more is better reported than padded).
MAX_SMALL_ORDER = 512
# The 2^k part is applied as Sylvester blocks of at most 2^RADIX_BITS, one matmul each: a radix-2
# butterfly makes k memory-bound passes of one add per element; ceil(k / 5) passes of <= 32
# multiply-adds run at matmul speed instead (bench/hadamard_speed.py times both against dense).
RADIX_BITS = 5


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p an odd prime and e <= 3, else None (degree <= 3 keeps the
    irreducibility test of :func:`_modulus` a root test)."""
    for e in (1, 2, 3):
        p = round(q ** (1.0 / e))
        for c in (p - 1, p, p + 1):
            if c > 2 and c ** e == q and _is_prime(c):
                return c, e
    return None


def _modulus(p: int, e: int) -> tuple[int, ...]:
    """Low coefficients (f_0..f_{e-1}) of a monic irreducible f of degree e over GF(p); for e <= 3
    irreducible = no root in GF(p). e = 1: f = X, elements are the residues themselves."""
    if e == 1:
        return (0,)
    for index in range(p ** e):
        low = tuple(index // p ** j % p for j in range(e))
        if all((x ** e + sum(c * x ** j for j, c in enumerate(low))) % p for x in range(p)):
            return low
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # unreachable


def _field_mul(a: list[int], b: list[int], f: tuple[int, ...], p: int) -> tuple[int, ...]:
    """Product of two GF(p^e) elements (coefficient lists, low first) modulo X^e + f."""
    e = len(f)
    prod = [0] * (2 * e - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            prod[i + j] += x * y
    for d in range(2 * e - 2, e - 1, -1):  # X^d = -X^(d-e) f_low
        top, prod[d] = prod[d], 0
        for j, c in enumerate(f):
            prod[d - e + j] -= top * c
    return tuple(c % p for c in prod[:e])


def _jacobsthal(q: int) -> torch.Tensor:
    """Q [q, q] int64 over GF(q): Q[i, j] = chi(x_i - x_j), element i has base-p digits (low first)."""
    p, e = _prime_power(q)
    f = _modulus(p, e)
    digits = [[i // p ** j % p for j in range(e)] for i in range(q)]
    squares = {_field_mul(d, d, f, p) for d in digits[1:]}
    chi = torch.tensor([0] + [1 if tuple(d) in squares else -1 for d in digits[1:]])
    dig = torch.tensor(digits)  # [q, e]
    diff = (dig[:, None, :] - dig[None, :, :]) % p  # [q, q, e]
    return chi[(diff * torch.tensor([p ** j for j in range(e)])).sum(-1)]


def _paley1(q: int) -> torch.Tensor:
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, 1, _jacobsthal(q)
    a, b = torch.tensor([[1, -1], [-1, -1]]), torch.tensor([[1, 1], [1, -1]])
    return torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def _construction(m: int) -> tuple[str, int] | None:
    """How order m is built: ("paley1" | "paley2", q), ("one", 1) for m = 1, or None."""
    if m == 1:
        return "one", 1
    if m % 4 or m > MAX_SMALL_ORDER:
        return None
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return "paley1", m - 1
    if _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2", m // 2 - 1
    return None


_BUILDERS = {"one": lambda q: torch.ones(1, 1, dtype=torch.int64), "paley1": _paley1, "paley2": _paley2}


@lru_cache(maxsize=None)
def _small(m: int) -> torch.Tensor:
    """H_m [m, m] fp32 +-1 on the CPU (cached: callers copy it, never write to it)."""
    name, q = _construction(m)
    return _BUILDERS[name](q).to(torch.float32)


def hadamard_order(n: int) -> tuple[int, int] | None:
    """(m, k) with n = m * 2^k and H_n = H_m (x) H_{2^k} buildable here, or None (no padding).

    m = 1 for powers of two; else the smallest buildable m = 4 o 2^j <= MAX_SMALL_ORDER, o the odd
    part of n (SmolLM2 576 -> (36, 4), 1536 -> (12, 7); phi-2 2560 -> (20, 7); 11008 -> (344, 5)).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"a width must be a positive int, got {n!r}")
    v = (n & -n).bit_length() - 1
    odd = n >> v
    if odd == 1:
        return 1, v
    for j in range(v - 1):  # k = v - 2 - j >= 0
        m = 4 * odd << j
        if m > MAX_SMALL_ORDER:
            break
        if _construction(m) is not None:
            return m, v - 2 - j
    return None


def small_orders(limit: int = MAX_SMALL_ORDER) -> tuple[int, ...]:
    """Every dense order m <= limit that :func:`hadamard_order` can return (1, 12, 20, 28, ...)."""
    return tuple(m for m in range(1, min(limit, MAX_SMALL_ORDER) + 1) if hadamard_order(m) == (m, 0))


def _order(n: int) -> tuple[int, int]:
    order = hadamard_order(n)
    if order is None:
        raise ValueError(f"width {n} is not m * 2^k for a Hadamard order m this module builds "
                         f"(m in {small_orders(64)}, ... up to {MAX_SMALL_ORDER}); it does not pad")
    return order


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """H_n [n, n] = H_m (x) H_{2^k}, unnormalised +-1 in ``dtype`` on the CPU (H H^T = n I);
    ValueError for an unsupported width. For tests and references: the transform never builds it."""
    m, k = _order(n)
    sylvester = torch.ones(1, 1)
    for _ in range(k):  # [[H, H], [H, -H]] = H_2 (x) H: Sylvester, H[i, j] = (-1)^popcount(i & j)
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    return torch.kron(_small(m), sylvester).to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype in (torch.float32, torch.float64):
        return dtype
    raise ValueError(f"Hadamard transforms need a floating dtype (fp16/bf16/fp32/fp64), got {dtype}")


def _factors(m: int, k: int, radix_bits: int) -> list[int]:
    """Orders of the Kronecker factors of H_{m 2^k}: m (when > 1), then 2^k split as evenly as
    possible into Sylvester blocks of at most 2^radix_bits (a radix-2^r Walsh-Hadamard butterfly)."""
    stages = -(-k // radix_bits)
    return ([m] if m > 1 else []) + [1 << (k // stages + (i < k % stages)) for i in range(stages)]


@lru_cache(maxsize=None)
def _factor(c: int) -> torch.Tensor:
    return hadamard_matrix(c)  # a Paley H_m or a Sylvester block: cached, never written


def _transform(y: torch.Tensor, dim: int, inverse: bool, radix_bits: int = 0) -> torch.Tensor:
    """Ĥ (or Ĥ^T) along ``dim`` of y already in its compute dtype: a new contiguous tensor (y is not
    written). y viewed as [A, c_1, ..., c_s, B] (c_i the factor orders, B the dims after ``dim``) gets
    one matmul per factor axis, all on contiguous views: (F_1 (x) ... (x) F_s) v for every vector
    v. 1/sqrt(n) is folded into the first factor."""
    n = y.shape[dim]
    m, k = _order(n)
    if y.numel() == 0:  # an empty batch: reshape(-1, c) cannot infer a size from 0 elements
        return y.clone()
    after = n * math.prod(y.shape[dim % y.dim() + 1:])
    z = y.contiguous()
    scale = 1.0 / math.sqrt(n)
    for i, c in enumerate(_factors(m, k, radix_bits or RADIX_BITS)):
        f = _factor(c).to(device=y.device, dtype=y.dtype)
        f = (f.T if inverse else f) * (scale if i == 0 else 1.0)
        after //= c
        # the last axis of the tensor is one plain GEMM; any other a matmul broadcast over the leading axes
        z = z.reshape(-1, c) @ f.T if after == 1 else torch.matmul(f, z.reshape(-1, c, after))
    if n == 1:
        z = z * scale
    return z.reshape(y.shape)


def hadamard_transform(x: torch.Tensor, dim: int = -1, *, inverse: bool = False,
                       radix_bits: int = 0) -> torch.Tensor:
    """Ĥ v for every vector v of x along ``dim`` (Ĥ = H_n / sqrt(n), n = x.shape[dim]); with
    ``inverse`` Ĥ^T v. x [..., n, ...] -> same shape and dtype, on x's device. For dim = -1 this is
    x @ Ĥ^T. ``radix_bits``: the largest Sylvester block applied as one matmul (1 = the classic
    radix-2 butterfly; 0 = RADIX_BITS); the same maths, grouped differently. ValueError for an
    unsupported width or a non-floating dtype."""
    if not isinstance(radix_bits, int) or isinstance(radix_bits, bool) or radix_bits < 0:
        raise ValueError(f"radix_bits must be a non-negative int, got {radix_bits!r}")
    return _transform(x.to(_compute_dtype(x.dtype)), dim, inverse, radix_bits).to(x.dtype)


def signs(n: int, seed: int) -> torch.Tensor:
    """+-1 fp32 [n] on the CPU, drawn from a CPU ``torch.Generator`` seeded with ``seed`` (never an
    accelerator's generator, so CPU and CUDA runs rotate with the same signs, bit for bit)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"signs need a positive int length, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"a rotation seed must be an int in [0, 2^63), got {seed!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).mul_(2).sub_(1).to(torch.float32)


def _signs_along(y: torch.Tensor, seed: int, dim: int) -> torch.Tensor:
    """signs(y.shape[dim], seed) on y's device and dtype, shaped to broadcast along ``dim``."""
    s = signs(y.shape[dim], seed).to(device=y.device, dtype=y.dtype)
    return s.view(-1, *([1] * (-dim - 1))) if dim < 0 else s.view(-1, *([1] * (y.dim() - dim - 1)))


def _forward(y: torch.Tensor, seed: int, dim: int) -> torch.Tensor:
    """R v = Ĥ S v along ``dim``."""
    return _transform(y * _signs_along(y, seed, dim), dim, False)


def _back(y: torch.Tensor, seed: int, dim: int) -> torch.Tensor:
    """R^T v = S Ĥ^T v along ``dim``."""
    out = _transform(y, dim, True)
    return out.mul_(_signs_along(out, seed, dim))


def rotate(w: torch.Tensor, seed_out: int, seed_in: int) -> torch.Tensor:
    """W [..., out, in] -> W' = R_out W R_in^T = Ĥ_out S_out W S_in Ĥ_in^T, same shape and dtype."""
    y = w.to(_compute_dtype(w.dtype))
    return _forward(_forward(y, seed_in, -1), seed_out, -2).to(w.dtype)


def unrotate(w_rot: torch.Tensor, seed_out: int, seed_in: int) -> torch.Tensor:
    """W' [..., out, in] -> W = R_out^T W' R_in = S_out Ĥ_out^T W' Ĥ_in S_in (inverse of rotate)."""
    y = w_rot.to(_compute_dtype(w_rot.dtype))
    return _back(_back(y, seed_in, -1), seed_out, -2).to(w_rot.dtype)


def unrotate_along(y: torch.Tensor, seed: int, dim: int) -> torch.Tensor:
    """R^T v for every vector v along ``dim`` (one side of :func:`unrotate`, so a caller can undo a
    rotation a slice at a time: rows for the input side, columns for the output side)."""
    return _back(y.to(_compute_dtype(y.dtype)), seed, dim).to(y.dtype)


def rotate_input(x: torch.Tensor, seed_in: int) -> torch.Tensor:
    """Activations x [..., in] -> R_in x (row layout x S_in Ĥ_in^T): what W' multiplies."""
    return _forward(x.to(_compute_dtype(x.dtype)), seed_in, -1).to(x.dtype)


def rotate_output(y_rot: torch.Tensor, seed_out: int) -> torch.Tensor:
    """W' outputs y' [..., out] -> y = R_out^T y' (row layout y' Ĥ_out S_out), the original basis."""
    return _back(y_rot.to(_compute_dtype(y_rot.dtype)), seed_out, -1).to(y_rot.dtype)


def unrotate_adapter(b_rot: torch.Tensor, a_rot: torch.Tensor, seed_out: int,
                     seed_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA pair of the rotated basis, B' [out, r] and A' [r, in], -> (B, A) = (R_out^T B',
    A' R_in) with B A = unrotate(B' A'): B = S_out Ĥ_out^T B' [out, r], A = A' Ĥ_in S_in [r, in]."""
    b = _back(b_rot.to(_compute_dtype(b_rot.dtype)), seed_out, -2).to(b_rot.dtype)
    a = _back(a_rot.to(_compute_dtype(a_rot.dtype)), seed_in, -1).to(a_rot.dtype)
    return b, a


def rotate_adapter(b: torch.Tensor, a: torch.Tensor, seed_out: int,
                   seed_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`unrotate_adapter`: B [out, r], A [r, in] -> (R_out B, A R_in^T)."""
    b_rot = _forward(b.to(_compute_dtype(b.dtype)), seed_out, -2).to(b.dtype)
    a_rot = _forward(a.to(_compute_dtype(a.dtype)), seed_in, -1).to(a.dtype)
    return b_rot, a_rot
