"""Distillation losses: the soft term is T^2 x KL (zero when the student equals the teacher),
the mix follows alpha, gradients reach the student only, feature maps project widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phases.compression.distill import FeatureProjector, feature_loss, response_loss


def test_response_loss_matches_its_formula_and_vanishes_on_the_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    kl = (F.softmax(t / 4, -1) * (F.log_softmax(t / 4, -1) - F.log_softmax(s / 4, -1))).sum(-1).mean() * 16
    ce = F.cross_entropy(s.reshape(-1, 11), labels.reshape(-1))
    assert float(response_loss(s, t, labels)) == pytest.approx(float(0.7 * kl + 0.3 * ce), rel=1e-5)
    assert float(response_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    t.requires_grad_(True)
    response_loss(s, t, labels).backward()
    assert s.grad is not None and t.grad is None, "the teacher is never trained"
    with pytest.raises(ValueError):
        response_loss(s, t[:, :4], labels)
    with pytest.raises(ValueError):
        response_loss(s, t, labels, temperature=0)


def test_feature_loss_projects_widths():
    s = [torch.randn(2, 3, 8), torch.randn(2, 3, 8)]
    t = [torch.randn(2, 3, 16), torch.randn(2, 3, 16)]
    proj = FeatureProjector(8, 16, 2)
    loss = feature_loss(s, t, proj)
    loss.backward()
    assert all(m.weight.grad is not None for m in proj.maps)
    assert float(feature_loss(t, t)) == 0.0
    with pytest.raises(ValueError):
        feature_loss(s, t)
