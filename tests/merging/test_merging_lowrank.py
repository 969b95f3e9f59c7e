"""adapterkit.lowrank: exact concatenated factors (padding dropped), best rank-n by SVD."""

from __future__ import annotations

import torch

from adapterkit.plugin_api import concat_factors, effective_rank, factorize, truncate


def factors(k: int, p: int, r: int, q: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, p, r, generator=g), torch.randn(k, r, q, generator=g)


def test_concat_is_exact_and_drops_only_padding() -> None:
    a, b = factors(3, 20, 5, 12)
    a[1, :, 3:], b[1, 3:] = 0, 0  # expert 1 has rank 3, padded to 5
    b[2, 4] = 0  # a genuine component with a zero B row but a live A column is kept
    w = [0.5, -2.0, 1.0]
    want = sum(wk * a[k].double() @ b[k].double() for k, wk in enumerate(w))
    for drop in (False, True):
        fa, fb = concat_factors(a, b, w, drop_padding=drop)
        assert fa.shape[1] == (13 if drop else 15)
        torch.testing.assert_close(fa.double() @ fb.double(), want, rtol=1e-5, atol=1e-5)
    assert [effective_rank(a[k], b[k]) for k in range(3)] == [5, 3, 5]
    fa, fb = concat_factors(torch.zeros(2, 4, 3), torch.zeros(2, 3, 6), [1.0, 1.0], drop_padding=True)
    assert fa.shape == (4, 1) and not fa.any() and not fb.any()


def test_truncate_is_the_best_rank_n_on_both_paths() -> None:
    for p, q, r in ((30, 20, 6), (8, 10, 12)):  # R < min(p, q): QR + small SVD; else the product's SVD
        a, b = factors(1, p, r, q, seed=p)
        product = a[0].double() @ b[0].double()
        s = torch.linalg.svdvals(product)
        for n in (1, 3, 5):
            ta, tb = truncate(a[0], b[0], n)
            assert ta.shape == (p, n) and tb.shape == (n, q) and ta.dtype == torch.float32
            err = torch.linalg.matrix_norm(ta.double() @ tb.double() - product)
            torch.testing.assert_close(err, s[n:].square().sum().sqrt(), rtol=1e-4, atol=1e-5)
    a, b = factors(1, 30, 4, 20)
    ta, tb = truncate(a[0], b[0], 9)  # more than the rank: exact, zero components fill up to 9
    assert ta.shape == (30, 9) and not ta[:, 4:].any()
    torch.testing.assert_close(ta @ tb, a[0] @ b[0], rtol=1e-5, atol=1e-5)


def test_factorize_full_rank_is_exact() -> None:
    m = torch.randn(12, 7, generator=torch.Generator().manual_seed(3))
    fa, fb = factorize(m)
    assert fa.shape == (12, 7) and fb.shape == (7, 7)
    torch.testing.assert_close(fa @ fb, m, rtol=1e-5, atol=1e-5)
