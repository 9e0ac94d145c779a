"""Masking: tube / random / frame masks, exact counts, true inverse permutations."""
import pytest
import torch

from echofm.engine.masking import MaskConfig, draw_mask, frame_mask, full_mask, keep_count, random_mask, tube_mask

B, T, L = 5, 6, 49


def _check_permutation(m, n):
    """ids_shuffle = [ids_keep, masked ids]; ids_restore must be its exact inverse."""
    keep = m.ids_keep
    masked = torch.stack([torch.nonzero(row).flatten() for row in m.mask])  # all rows same count
    shuffle = torch.cat([keep, masked], 1)
    ar = torch.arange(n).expand(keep.shape[0], n)
    assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), ar)
    assert torch.equal(torch.gather(m.ids_restore, 1, shuffle), ar)
    # the binary mask agrees with ids_keep
    assert torch.equal(m.mask.gather(1, keep), torch.zeros_like(keep, dtype=m.mask.dtype))
    assert int(m.mask.sum()) == keep.shape[0] * (n - keep.shape[1])


def test_keep_count_is_the_official_int_expression():
    """int(L * (1 - r)) as the official code (round() would keep 20, 5, 10 and 74 here)."""
    assert keep_count(196, 0.9) == 19 and keep_count(196, 0.75) == 49
    assert keep_count(49, 0.9) == 4 and keep_count(100, 0.9) == 9  # 1 - 0.9 = 0.0999... in binary
    assert keep_count(294, 0.75) == 73 and keep_count(16, 0.99) == 1  # at least one kept
    for n in range(1, 300):
        for r in (0.5, 0.6, 0.75, 0.8, 0.9, 0.95):
            assert keep_count(n, r) == max(1, int(n * (1 - r)))


@pytest.mark.parametrize("ratio,k", [(0.75, 12), (0.9, 4), (0.5, 24)])
def test_tube_mask_same_spatial_set_every_slice(ratio, k):
    g = torch.Generator().manual_seed(0)
    m = tube_mask(B, T, L, ratio, generator=g)
    assert m.ids_keep.shape == (B, T * k) and m.grid == (T, k)
    grid = m.ids_keep.view(B, T, k)
    t_of, s_of = grid // L, grid % L
    # ordered (t, k): slice t holds exactly the tokens of time t
    assert torch.equal(t_of, torch.arange(T).view(1, T, 1).expand(B, T, k))
    # the same spatial positions at every t, sorted and unique
    assert torch.equal(s_of, s_of[:, :1].expand(B, T, k))
    assert (s_of[:, 0, 1:] > s_of[:, 0, :-1]).all()
    # the binary mask is a tube: constant along t
    mm = m.mask.view(B, T, L)
    assert torch.equal(mm, mm[:, :1].expand(B, T, L))
    assert torch.equal(mm.sum(-1), torch.full((B, T), float(L - k)))
    _check_permutation(m, T * L)
    # different clips differ
    sets = {tuple(row.tolist()) for row in s_of[:, 0]}
    assert len(sets) == B


def test_random_and_frame_masks():
    g = torch.Generator().manual_seed(1)
    n = T * L
    m = random_mask(B, T, L, 0.75, generator=g)
    assert m.ids_keep.shape == (B, 73) and m.grid is None  # int(294 * 0.25)
    assert (m.ids_keep[:, 1:] > m.ids_keep[:, :-1]).all()
    _check_permutation(m, n)
    f = frame_mask(B, T, L, 0.5, generator=g)
    tk = 3  # int(6 * 0.5)
    assert f.ids_keep.shape == (B, tk * L)
    per_slice = (1 - f.mask).view(B, T, L).sum(-1)
    assert set(per_slice.unique().tolist()) <= {0.0, float(L)}  # whole slices only
    assert torch.equal(per_slice.sum(-1), torch.full((B,), float(tk * L)))
    assert torch.equal(f.slice_valid().sum(-1), torch.full((B,), tk))
    _check_permutation(f, n)


def test_full_mask_and_draw_mask_dispatch():
    m = full_mask(2, T, L)
    assert m.mask.sum() == 0 and m.grid == (T, L)
    assert torch.equal(m.ids_keep[0], torch.arange(T * L))
    assert draw_mask(MaskConfig(kind="tube", ratio=0.0), 2, T, L).grid == (T, L)
    assert draw_mask(MaskConfig(kind="random", ratio=0.9), 2, T, L).grid is None


def test_generator_makes_masks_reproducible():
    a = tube_mask(3, T, L, 0.75, generator=torch.Generator().manual_seed(7))
    b = tube_mask(3, T, L, 0.75, generator=torch.Generator().manual_seed(7))
    c = tube_mask(3, T, L, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.ids_keep, b.ids_keep) and not torch.equal(a.ids_keep, c.ids_keep)


def test_mask_config_validates_ratio():
    with pytest.raises(ValueError):
        MaskConfig(ratio=1.0).validate()
