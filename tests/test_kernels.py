"""kernels/fp8_blockwise.py: block FP8 round trips stay within e4m3's error bound (exactly the
bound the module states, and the bound is reached: it is tight); the torch reference rounds
ties to even and gives a block of zeros scale 1; the Triton kernels give the reference's codes,
scales and values bit for bit, on CPU under Triton's interpreter (skipped without triton);
`python -m kernels.bench` reports GB/s. Shapes here are small and mostly not multiples of 128.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernels import fp8_blockwise as fp8

FP8_CODES = torch.float8_e4m3fn
NORMAL_RELATIVE = 2.0 ** -4  # e4m3: 3 mantissa bits, half a unit in the last place
SUBNORMAL_ABSOLUTE = 2.0 ** -10  # in units of the block's scale: half of the subnormal spacing 2^-9
SMALLEST_NORMAL = 2.0 ** -6

WEIGHT_SHAPES = [(300, 200), (129, 385), (5, 7), (128, 256)]
ACTIVATION_SHAPES = [(3, 7, 300), (1, 130), (33, 128)]


def student_t(shape: tuple[int, ...], generator: torch.Generator, df: int = 2) -> torch.Tensor:
    """Heavy-tailed samples (Student-t, `df` degrees of freedom: z / sqrt(chi2_df / df))."""
    z = torch.randn(shape, generator=generator)
    chi2 = sum(torch.randn(shape, generator=generator) ** 2 for _ in range(df))
    return z / torch.sqrt(chi2 / df)


def sample(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=generator) * 0.02
    return student_t(shape, generator) * 0.02


def per_element(scales: torch.Tensor, shape: tuple[int, ...], weight: bool) -> torch.Tensor:
    """Each element's block scale, expanded to `shape`."""
    if weight:
        return scales.repeat_interleave(fp8.BLOCK, 0).repeat_interleave(fp8.BLOCK, 1)[: shape[0], : shape[1]]
    return scales.repeat_interleave(fp8.BLOCK, -1)[..., : shape[-1]]


def round_trip(values: torch.Tensor, weight: bool):
    quantize = fp8.quantize_weight if weight else fp8.quantize_activation
    dequantize = fp8.dequantize_weight if weight else fp8.dequantize_activation
    codes, scales = quantize(values, backend="torch")
    back = dequantize(codes, scales, torch.float32, backend="torch")
    return codes, scales, back


# --------------------------------------------------------------------------- error bound (torch reference)


@pytest.mark.parametrize("kind", ["normal", "student_t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_e4m3_bound(kind, dtype):
    """|dequantize(quantize(w)) - w| <= 2^-4 |w| + 2^-10 s, elementwise (s: the block's scale),
    for weights (128x128 blocks) and activations (1x128 tiles); scales are amax / 448."""
    for weight, shapes in ((True, WEIGHT_SHAPES), (False, ACTIVATION_SHAPES)):
        for i, shape in enumerate(shapes):
            values = sample(kind, shape, seed=i).to(dtype)
            codes, scales, back = round_trip(values, weight)
            assert codes.dtype == FP8_CODES and codes.shape == values.shape and scales.dtype == torch.float32
            exact = values.float()
            s = per_element(scales, shape, weight)
            bound = NORMAL_RELATIVE * exact.abs() + SUBNORMAL_ABSOLUTE * s
            assert bool(((back - exact).abs() <= bound).all()), (kind, dtype, shape, weight)
            # the scale is the block's amax / 448
            if weight:
                blocks = torch.nn.functional.pad(exact.abs(), (0, -shape[1] % 128, 0, -shape[0] % 128))
                amax = blocks.view(scales.shape[0], 128, scales.shape[1], 128).amax(dim=(1, 3))
            else:
                tiles = torch.nn.functional.pad(exact.abs(), (0, -shape[-1] % 128))
                amax = tiles.view(*scales.shape, 128).amax(dim=-1)
            assert torch.equal(scales, amax / 448.0)


def test_the_bound_is_reached():
    """The stated bound is tight: Student-t blocks (most values far below the block's amax)
    reach both the normal (2^-4 relative) and the subnormal (2^-10 s) parts of it."""
    values = sample("student_t", (256, 384), seed=7)
    codes, scales, back = round_trip(values, weight=True)
    s = per_element(scales, values.shape, weight=True)
    error = (back - values).abs()
    normal = (values.abs() / s) >= SMALLEST_NORMAL
    worst_relative = (error[normal] / values[normal].abs()).max().item()
    worst_subnormal = (error[~normal] / s[~normal]).max().item()
    print(f"\nworst normal relative error {worst_relative:.5f} (bound {NORMAL_RELATIVE}); worst subnormal "
          f"error {worst_subnormal:.6f} s (bound {SUBNORMAL_ABSOLUTE:.6f} s); {int((~normal).sum())} subnormals")
    # the largest relative rounding error of a 3-bit mantissa is 2^-4 / (1 + 2^-4) = 0.941 of 2^-4
    assert 0.93 * NORMAL_RELATIVE < worst_relative <= NORMAL_RELATIVE
    assert 0.9 * SUBNORMAL_ABSOLUTE < worst_subnormal <= SUBNORMAL_ABSOLUTE


def test_ties_round_to_even_and_zero_blocks_get_scale_one():
    """A block with amax 448 has scale 1, so the codes are the values rounded: halfway cases go
    to the even code (normal and subnormal); -0.0 keeps its sign; an all-zero block gets scale
    1.0 (transformers' Fp8Quantize convention) and codes 0."""
    tiny = 2.0 ** -10  # half of e4m3's smallest subnormal 2^-9
    values = torch.tensor([448.0, 1.0625, 1.1875, tiny, 3 * tiny, -0.0, -448.0, 0.5 * SMALLEST_NORMAL])
    expected = torch.tensor([448.0, 1.0, 1.25, 0.0, 4 * tiny, -0.0, -448.0, 0.5 * SMALLEST_NORMAL])
    weight = torch.zeros(130, 260)
    weight[0, :8] = values
    codes, scales = fp8.quantize_weight(weight, backend="torch")
    assert scales.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]  # one block of amax 448, five of zeros
    assert torch.equal(codes[0, :8].float(), expected)
    assert torch.equal(codes[0, :8].float().signbit(), expected.signbit())
    assert not codes[1:].float().any() and not codes[:, 128:].float().any()
    act_codes, act_scales = fp8.quantize_activation(torch.zeros(2, 200), backend="torch")
    assert act_scales.tolist() == [[1.0, 1.0], [1.0, 1.0]] and not act_codes.float().any()


def test_dispatch_runs_the_reference_on_cpu_and_explains_the_interpreter(monkeypatch):
    weight = sample("normal", (40, 50), seed=3)
    assert not fp8._use_triton(weight, "auto")
    codes, scales = fp8.quantize_weight(weight)
    reference = fp8.quantize_weight_reference(weight)
    assert torch.equal(codes.view(torch.uint8), reference[0].view(torch.uint8)) and torch.equal(scales, reference[1])
    with pytest.raises(ValueError, match=r"codes \(40, 50\) need scales \(1, 1\), got \(2, 1\)"):
        fp8.dequantize_weight(codes, torch.ones(2, 1))
    if fp8.triton_installed():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
            fp8.quantize_weight(weight, backend="triton")


# --------------------------------------------------------------------------- Triton = reference, bit for bit

requires_triton = pytest.mark.skipif(not fp8.triton_installed(), reason="triton is not installed: the Triton kernels "
                                     "are not checked (pip install -c constraints-cpu.txt triton)")


@pytest.fixture(scope="module")
def interpreter():
    """Triton's CPU interpreter: TRITON_INTERPRET=1 before kernels.fp8_blockwise_triton is imported."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import kernels.fp8_blockwise_triton  # noqa: F401

    yield
    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (NaNs: equal positions, whatever their payload)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() > 1:
        nan = a.isnan()
        if not torch.equal(nan, b.isnan()):
            return False
        a, b = a[~nan], b[~nan]
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.view(integer), b.view(integer))


@requires_triton
@pytest.mark.parametrize("kind", ["normal", "student_t"])
def test_triton_weight_kernels_match_the_reference_bit_for_bit(interpreter, kind):
    for i, shape in enumerate(WEIGHT_SHAPES):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            weight = sample(kind, shape, seed=10 + i).to(dtype)
            if shape[0] > 128:
                weight[:128, :128] = 0  # a block of zeros
            ours, theirs = fp8.quantize_weight(weight, "triton"), fp8.quantize_weight(weight, "torch")
            assert same_bits(ours[0], theirs[0]) and same_bits(ours[1], theirs[1]), (shape, dtype)
        for out in (torch.float32, torch.bfloat16, torch.float16):
            a = fp8.dequantize_weight(*theirs, out, backend="triton")
            b = fp8.dequantize_weight(*theirs, out, backend="torch")
            assert same_bits(a, b), (shape, out)


@requires_triton
def test_triton_activation_kernels_match_the_reference_bit_for_bit(interpreter):
    for i, shape in enumerate(ACTIVATION_SHAPES):
        for kind in ("normal", "student_t"):
            x = sample(kind, shape, seed=20 + i).to(torch.bfloat16)
            ours, theirs = fp8.quantize_activation(x, "triton"), fp8.quantize_activation(x, "torch")
            assert same_bits(ours[0], theirs[0]) and same_bits(ours[1], theirs[1]), (shape, kind)
            for out in (torch.float32, torch.bfloat16):
                assert same_bits(fp8.dequantize_activation(*theirs, out, backend="triton"),
                                 fp8.dequantize_activation(*theirs, out, backend="torch")), (shape, out)


@requires_triton
def test_triton_ties_signs_and_every_code(interpreter):
    """The hand-written e4m3 encoding and decoding against torch's casts: halfway cases, -0.0,
    saturation at 448, and all 256 codes (NaN codes included) decoded to fp32 and bf16."""
    tiny = 2.0 ** -10
    weight = torch.zeros(3, 140)
    weight[0, :9] = torch.tensor([448.0, 1.0625, 1.1875, tiny, 3 * tiny, -0.0, -448.0, 2.0 ** -7, 447.9])
    weight[1] = torch.linspace(-448.0, 448.0, 140)
    weight[2] = torch.linspace(-2.0 ** -6, 2.0 ** -6, 140) * 448.0 / 2.0 ** -6  # the subnormal range, scaled
    for tensor in (weight, weight[:, :128] * 3.0):
        assert all(same_bits(a, b) for a, b in zip(fp8.quantize_weight(tensor, "triton"),
                                                   fp8.quantize_weight(tensor, "torch")))
    every_code = torch.arange(256, dtype=torch.uint8).view(2, 128).view(FP8_CODES)
    scales = torch.tensor([[0.37]])
    for out in (torch.float32, torch.bfloat16):
        assert same_bits(fp8.dequantize_weight(every_code, scales, out, backend="triton"),
                         fp8.dequantize_weight(every_code, scales, out, backend="torch"))


# --------------------------------------------------------------------------- the benchmark


def test_bench_reports_gb_per_s(capsys, monkeypatch):
    from kernels import bench

    argv = ["--rows", "130", "--cols", "300", "--repeats", "1"]
    if fp8.triton_installed():
        argv.append("--triton")  # the interpreter on these shapes: a few seconds
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # bench sets it too; monkeypatch restores it afterwards
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["device"] == "cpu"
    backends = {"torch", "triton"} if fp8.triton_installed() else {"torch"}
    assert {row["backend"] for row in report["rows"]} == backends
    assert len(report["rows"]) == 4 * len(backends) and all(row["gb_per_s"] > 0 for row in report["rows"])
