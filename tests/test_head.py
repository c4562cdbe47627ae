"""The plain-PyTorch CALM head against a naive float64 implementation of the definitions (CALM.md §1)."""

import pytest
import torch

from calm_fast import head
from calm_fast.modes import MapKind, Objective, Prior


def naive_probabilities(class_logits, location_scores, prior):
    """Products and sums straight from the definitions, in float64: (p(y|z) [B,K,N], p(z) [B,N])."""
    s = class_logits.double().flatten(2)
    a = location_scores.double().flatten(1)
    p_y_given_z = torch.exp(s) / torch.exp(s).sum(dim=1, keepdim=True)
    if prior == "softmax":
        p_z = torch.exp(a) / torch.exp(a).sum(dim=1, keepdim=True)
    else:
        r = torch.clamp(a, min=0)
        total = r.sum(dim=1, keepdim=True)
        p_z = torch.where(total > 0, r / torch.where(total > 0, total, 1.0), 1.0 / r.shape[1])
    return p_y_given_z, p_z


def random_inputs(b=3, k=5, h=4, w=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, h, w, generator=g).to(dtype)
    a = torch.randn(b, 1, h, w, generator=g).to(dtype)
    return s, a


@pytest.mark.parametrize("prior", tuple(Prior))
def test_log_marginal_matches_naive_definition(prior):
    s, a = random_inputs()
    p_yz, p_z = naive_probabilities(s, a, prior)
    expected = torch.log((p_yz * p_z[:, None, :]).sum(dim=2))
    got = head.log_marginal(s, a, prior)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prior", tuple(Prior))
def test_marginal_sums_to_one_and_joint_sums_to_marginal(prior):
    s, a = random_inputs(seed=1)
    marginal = head.log_marginal(s, a, prior).exp()
    torch.testing.assert_close(marginal.sum(dim=1), torch.ones(3), rtol=1e-5, atol=1e-6)
    labels = torch.tensor([0, 2, 4])
    joint = head.attribution_map(s, a, labels, "joint", prior)
    torch.testing.assert_close(joint.flatten(1).sum(dim=1), marginal[torch.arange(3), labels])


@pytest.mark.parametrize("prior", tuple(Prior))
def test_maps_match_naive_definition(prior):
    s, a = random_inputs(seed=2)
    labels = torch.tensor([1, 0, 3])
    p_yz, p_z = naive_probabilities(s, a, prior)
    joint = p_yz[torch.arange(3), labels] * p_z
    posterior = joint / joint.sum(dim=1, keepdim=True)
    shape = (3, 4, 6)
    torch.testing.assert_close(head.attribution_map(s, a, labels, "joint", prior).double(), joint.reshape(shape))
    torch.testing.assert_close(
        head.attribution_map(s, a, labels, "posterior", prior).double(), posterior.reshape(shape)
    )
    torch.testing.assert_close(head.attribution_map(s, a, labels, "prior", prior).double(), p_z.reshape(shape))
    torch.testing.assert_close(head.attribution_map(s, a, labels, "class"), s[torch.arange(3), labels])


@pytest.mark.parametrize("prior", tuple(Prior))
def test_losses_match_naive_definition(prior):
    s, a = random_inputs(seed=3)
    labels = torch.tensor([4, 1, 2])
    p_yz, p_z = naive_probabilities(s, a, prior)
    joint = p_yz[torch.arange(3), labels] * p_z  # [B, N]
    marginal = joint.sum(dim=1)
    q = joint / marginal[:, None]
    expected_ml = -torch.log(marginal).mean()
    expected_em = -torch.special.xlogy(q, joint).sum(dim=1).mean()  # 0·log 0 = 0 on zero-prior cells
    torch.testing.assert_close(head.calm_loss(s, a, labels, "ml", prior).double(), expected_ml)
    torch.testing.assert_close(head.calm_loss(s, a, labels, "em", prior).double(), expected_em)


def test_cam_loss_is_cross_entropy_of_pooled_logits():
    s, _ = random_inputs(seed=4)
    labels = torch.tensor([0, 1, 2])
    pooled = s.double().mean(dim=(2, 3))
    expected = -(pooled[torch.arange(3), labels] - torch.log(torch.exp(pooled).sum(dim=1))).mean()
    torch.testing.assert_close(head.calm_loss(s, None, labels, "cam").double(), expected)


@pytest.mark.parametrize("prior", tuple(Prior))
def test_em_and_ml_gradients_agree(prior):
    """Fisher's identity: with q detached, the EM loss has the ML loss's gradient for every input."""
    s, a = random_inputs(b=4, k=7, h=5, w=5, seed=5)
    a = a.abs() if prior == "relu" else a  # away from the ReLU kink, where the two are equal exactly
    a[0, 0, 0, :3] = -1.0  # zero-prior cells too
    labels = torch.tensor([6, 0, 3, 3])
    grads = {}
    for objective in ("em", "ml"):
        s_ = s.clone().requires_grad_()
        a_ = a.clone().requires_grad_()
        head.calm_loss(s_, a_, labels, objective, prior).backward()
        grads[objective] = (s_.grad, a_.grad)
    torch.testing.assert_close(grads["em"][0], grads["ml"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["em"][1], grads["ml"][1], rtol=1e-5, atol=1e-7)


def test_em_value_is_ml_plus_posterior_entropy():
    s, a = random_inputs(seed=6)
    labels = torch.tensor([1, 1, 1])
    q = head.attribution_map(s, a, labels, "posterior").flatten(1).double()
    entropy = -(torch.where(q > 0, q * torch.log(q), torch.zeros_like(q))).sum(dim=1).mean()
    em = head.calm_loss(s, a, labels, "em").double()
    ml = head.calm_loss(s, a, labels, "ml").double()
    torch.testing.assert_close(em, ml + entropy, rtol=1e-5, atol=1e-6)


def test_relu_prior_gradient_uses_detached_normaliser():
    """d log p(z)/d a_z = 1 / relu(a_z) only (the normaliser carries no gradient), 0 where relu is off."""
    a = torch.tensor([[2.0, 0.5, -1.0, 4.0]], requires_grad=True)
    head.log_prior(a, "relu").sum().backward()
    torch.testing.assert_close(a.grad, torch.tensor([[0.5, 2.0, 0.0, 0.25]]))


def test_all_zero_relu_prior_is_uniform_and_never_nan():
    s, _ = random_inputs(b=2, seed=7)
    a = -torch.rand(2, 1, 4, 6) - 0.1  # relu(a) is zero everywhere
    a[1, 0, 2, 3] = 0.0  # exactly zero counts as zero too
    s.requires_grad_()
    a.requires_grad_()
    labels = torch.tensor([0, 4])
    prior_map = head.attribution_map(s, a, labels, "prior")
    torch.testing.assert_close(prior_map, torch.full((2, 4, 6), 1 / 24))
    for objective in ("em", "ml"):
        loss = head.calm_loss(s, a, labels, objective)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(s.grad).all() and torch.isfinite(a.grad).all()
    expected = torch.log_softmax(s.detach().double(), dim=1).exp().mean(dim=(2, 3)).log()
    torch.testing.assert_close(head.log_marginal(s, a).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prior", tuple(Prior))
def test_extreme_logits_stay_finite(prior):
    s, a = random_inputs(seed=8)
    s = s * 1e4
    a = a * 1e4
    labels = torch.tensor([0, 1, 2])
    for objective in ("em", "ml"):
        s_ = s.clone().requires_grad_()
        a_ = a.clone().requires_grad_()
        loss = head.calm_loss(s_, a_, labels, objective, prior)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s_.grad).all() and torch.isfinite(a_.grad).all()
    assert torch.isfinite(head.log_marginal(s, a, prior)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prior", tuple(Prior))
def test_half_precision_inputs_compute_in_fp32(dtype, prior):
    s, a = random_inputs(seed=9, dtype=dtype)
    got = head.log_marginal(s, a, prior)
    assert got.dtype == torch.float32
    # the same values as the fp32 computation on the (already rounded) half inputs
    torch.testing.assert_close(got, head.log_marginal(s.float(), a.float(), prior))
    s_ = s.clone().requires_grad_()
    head.calm_loss(s_, a, torch.tensor([0, 1, 2]), "em", prior).backward()
    assert s_.grad.dtype == dtype and torch.isfinite(s_.grad.float()).all()


def test_class_log_probs_dispatches_per_method():
    s, a = random_inputs(seed=10)
    torch.testing.assert_close(head.class_log_probs(s, a, "cam"), head.cam_log_probs(s))
    torch.testing.assert_close(head.class_log_probs(s, a, "calm-em"), head.log_marginal(s, a))
    assert head.method_objective("calm-ml") == "ml"


def test_bad_arguments_name_the_argument():
    s, a = random_inputs()
    with pytest.raises(ValueError, match="prior='bogus'"):
        head.log_marginal(s, a, prior="bogus")
    with pytest.raises(ValueError, match="location_scores"):
        head.log_marginal(s, a[:, :, :2])
    with pytest.raises(ValueError, match="kind="):
        head.attribution_map(s, a, torch.zeros(3, dtype=torch.long), kind="cam")


@pytest.mark.parametrize("objective", ("em", "ml", "cam"))
def test_merged_loss_equals_calm_loss_of_the_two_maps(objective):
    """The loss of merged head maps (class channels, location channel, padding) is calm_loss of its slices,
    and its gradient reaches the class and location channels only."""
    s, a = random_inputs(seed=11)
    maps = torch.cat([s, a, torch.zeros(3, 2, 4, 6)], dim=1).requires_grad_()
    labels = torch.tensor([0, 4, 2])
    loss = head.merged_loss(maps, labels, 5, objective, backend="torch")
    expected = head.calm_loss(s, None if objective == "cam" else a, labels, objective)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, maps)
    assert (grad[:, 6:] == 0).all() and grad[:, :5].abs().sum() > 0
    assert (grad[:, 5] == 0).all() == (objective == "cam")
    with pytest.raises(ValueError, match="head_maps must be"):
        head.merged_loss(maps[:, :5], labels, 5, "em", backend="torch")


# ---- non-finite inputs and bad labels: loud, never a plausible number. Every implementation of the loss
# is listed here (a new fused op joins LOSS_BACKENDS through calm_fast.head's backend choice).
LOSS_BACKENDS = ("torch", "triton")


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("prior", list(Prior))
@pytest.mark.parametrize("objective", ("em", "ml"))
@pytest.mark.parametrize("tensor", ("class_logits", "location_scores"))
@pytest.mark.parametrize("value", (float("nan"), float("inf")))
def test_a_nan_or_inf_input_gives_a_non_finite_loss(backend, prior, objective, tensor, value):
    s, a = random_inputs(seed=11)
    labels = torch.tensor([0, 1, 2])
    clean = head.calm_loss(s, a, labels, objective, prior, backend=backend)
    assert torch.isfinite(clean)
    (s if tensor == "class_logits" else a)[1, 0, 2, 3] = value
    loss = head.calm_loss(s, a, labels, objective, prior, backend=backend)
    assert not torch.isfinite(loss), f"{objective} loss {loss.item()} with a {value} in {tensor}"
    # the other images keep their values: the damage stays in the image it came from
    log_marginal = head.log_marginal(s, a, prior, backend=backend)
    assert not torch.isfinite(log_marginal[1]).any()
    clean_marginal = head.log_marginal(*random_inputs(seed=11), prior, backend=backend)
    torch.testing.assert_close(log_marginal[[0, 2]], clean_marginal[[0, 2]])


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("objective", ("em", "ml"))
@pytest.mark.parametrize("channel", (1, 5))  # a class channel, the location channel
@pytest.mark.parametrize("value", (float("nan"), float("inf")))
def test_the_merged_training_loss_is_not_finite_either(backend, objective, channel, value):
    s, a = random_inputs(seed=16)
    maps = torch.cat([s, a, torch.zeros(3, 2, 4, 6)], dim=1)
    labels = torch.tensor([0, 4, 2])
    assert torch.isfinite(head.merged_loss(maps, labels, 5, objective, backend=backend))
    maps[2, channel, 1, 1] = value
    assert not torch.isfinite(head.merged_loss(maps, labels, 5, objective, backend=backend))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got 5"):
        head.merged_loss(maps, torch.tensor([0, 5, 2]), 5, objective, backend=backend)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_cam_loss_with_a_nan_logit_is_nan(backend):
    s, a = random_inputs(seed=12)
    s[0, 1, 0, 0] = float("nan")
    assert torch.isnan(head.calm_loss(s, a, torch.tensor([0, 1, 2]), "cam", backend=backend))


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("objective", list(Objective))
def test_labels_of_the_wrong_shape_or_type_are_refused(backend, objective):
    s, a = random_inputs(seed=13)
    with pytest.raises(ValueError, match=r"labels must have shape \[B\] = \(3,\), got \(2,\)"):
        head.calm_loss(s, a, torch.tensor([0, 1]), objective, backend=backend)
    with pytest.raises(ValueError, match=r"labels must have shape \[B\]"):
        head.calm_loss(s, a, torch.tensor([[0], [1], [2]]), objective, backend=backend)
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            head.calm_loss(s, a, torch.tensor([0, 1, 1]).to(dtype), objective, backend=backend)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("bad", (5, -1))
def test_out_of_range_labels_name_the_range(backend, objective, bad):
    s, a = random_inputs(seed=14)  # K = 5
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 5\), got {bad}"):
        head.calm_loss(s, a, torch.tensor([0, bad, 2]), objective, backend=backend)


@pytest.mark.parametrize("objective", (Objective.EM, Objective.ML))
@pytest.mark.parametrize("merged", (False, True))
def test_the_fused_loss_off_the_cpu_gets_the_labels_with_no_op_around_it(monkeypatch, objective, merged):
    """Off the CPU the fused op itself turns an out-of-range label into a NaN loss, so the head must not add
    a range check (launches, a host sync) around it: no aten op runs besides the op, and the op gets the
    labels tensor itself. Meta tensors stand in for CUDA ones (any device but the CPU takes this path)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import calm_fast.kernels.calm_loss as fused

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    seen = {}
    result = torch.empty((), device="meta")

    def fake_op(scores, labels, num_classes, prior, objective_name, location=None):
        seen.update(labels=labels, num_classes=num_classes, objective=objective_name)
        return result

    monkeypatch.setattr(fused, "calm_loss", fake_op)
    labels = torch.tensor([0, 7, 2], device="meta")  # 7 is out of range: the op's business here
    maps = torch.empty(3, 8, 4, 4, device="meta")
    with Recorder() as recorder:
        if merged:
            loss = head.merged_loss(maps, labels, 5, objective, backend="triton")
        else:
            loss = head.calm_loss(maps[:, :5], maps[:, 5:6], labels, objective, backend="triton")
    assert loss is result and seen["labels"] is labels and seen["objective"] == objective.value
    assert [op for op in recorder.ops if "slice" not in op] == []  # only the views of the unmerged call


@pytest.mark.parametrize("kind", list(MapKind))
def test_attribution_map_checks_labels_too(kind):
    s, a = random_inputs(seed=15)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got 7"):
        head.attribution_map(s, a, torch.tensor([0, 7, 2]), kind)
    with pytest.raises(ValueError, match=r"labels must have shape \[B\]"):
        head.attribution_map(s, a, torch.tensor([0, 1]), kind)


def test_the_kernels_implement_every_prior_and_the_backend_is_read_once(monkeypatch):
    from calm_fast.kernels import calm_head  # kernels/ cannot import calm_fast.modes; its list must agree

    assert set(calm_head.PRIORS) == set(Prior)
    head.default_backend.cache_clear()
    monkeypatch.setenv("CALM_FAST_HEAD_BACKEND", "torch")
    assert head.default_backend() is head.Backend.TORCH
    monkeypatch.setenv("CALM_FAST_HEAD_BACKEND", "bogus")  # read once per process: no longer looked at
    assert head.default_backend() is head.Backend.TORCH
    head.default_backend.cache_clear()
    with pytest.raises(ValueError, match="CALM_FAST_HEAD_BACKEND='bogus'"):
        head.default_backend()
    head.default_backend.cache_clear()
