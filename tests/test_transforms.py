"""torch.func transforms and forward-mode AD: bn_ext falls back to torch's batch_norm under them
(its ops have no batching rules or jvp), so results, running statistics and num_batches_tracked
are torch's. Each test runs the same thing on torch's layer and on bn_ext's and compares."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

import bn_ext

CLASSES = [(torch.nn.BatchNorm1d, bn_ext.BatchNorm1d, (6, 3, 5)),
           (torch.nn.BatchNorm2d, bn_ext.BatchNorm2d, (4, 3, 3, 2))]


def _pair(torch_cls, ours_cls, training, **kw):
    ref = torch_cls(3, dtype=torch.float64, **kw)
    with torch.no_grad():
        if ref.affine:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        if ref.track_running_stats:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    ours = ours_cls(3, dtype=torch.float64, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref.train(training), ours.train(training)


def _same_state(ref, ours):
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, msg=k)


@pytest.mark.parametrize("torch_cls,ours_cls,shape", CLASSES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_forward_mode_ad(torch_cls, ours_cls, shape, training, momentum):
    ref, ours = _pair(torch_cls, ours_cls, training, momentum=momentum)
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.randn(shape, dtype=torch.float64)
    results = []
    for m in (ref, ours):
        with fwAD.dual_level():
            y = m(fwAD.make_dual(x, t))
            results.append(tuple(fwAD.unpack_dual(y)))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    _same_state(ref, ours)
    # and the jvp is the derivative: a finite difference of bn_ext's own (kernel) forward
    if not training:
        h = 1e-6
        fd = (ours(x + h * t) - ours(x - h * t)) / (2 * h)
        torch.testing.assert_close(results[1][1], fd, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("torch_cls,ours_cls,shape", CLASSES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_grad_jvp_jacrev(torch_cls, ours_cls, shape, training):
    # in training, statistics untracked: torch refuses their in-place update inside grad
    kw = {"track_running_stats": False} if training else {}
    ref, ours = _pair(torch_cls, ours_cls, training, **kw)
    x = torch.randn(shape, dtype=torch.float64)
    got = []
    for m in (ref, ours):
        params = dict(m.named_parameters())
        loss = lambda p, x: functional_call(m, p, (x,)).square().sum()  # noqa: E731
        g = grad(loss)(params, x)
        out, tangent = jvp(lambda x: functional_call(m, params, (x,)), (x,), (torch.ones_like(x),))
        jac = jacrev(lambda x: functional_call(m, params, (x,)))(x[:2])
        got.append((g, out, tangent, jac))
    (g0, o0, t0, j0), (g1, o1, t1, j1) = got
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], msg=k)
    torch.testing.assert_close(o1, o0)
    torch.testing.assert_close(t1, t0)
    torch.testing.assert_close(j1, j0)
    _same_state(ref, ours)


@pytest.mark.parametrize("torch_cls,ours_cls,shape", CLASSES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap(torch_cls, ours_cls, shape, training):
    # an ensemble-style vmap over a leading dimension; training needs untracked statistics
    # (torch refuses an in-place update of unbatched buffers with batched values)
    kw = {"track_running_stats": False} if training else {}
    ref, ours = _pair(torch_cls, ours_cls, training, **kw)
    xs = torch.randn((5,) + shape, dtype=torch.float64)
    torch.testing.assert_close(vmap(ours)(xs), vmap(ref)(xs))
    torch.testing.assert_close(vmap(ours)(xs)[2], ours(xs[2]))


def test_kernels_still_used_outside_transforms(monkeypatch):
    # the fallback is only for transforms: a plain call must not reach torch.batch_norm
    def refuse(*args, **kwargs):
        raise AssertionError("torch.batch_norm called outside a transform")

    monkeypatch.setattr(torch, "batch_norm", refuse)
    m = bn_ext.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    m(x).sum().backward()
    m.eval()
    m(x).sum().backward()


def _refusal(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)
    return None


TRANSFORMS = {
    "grad": lambda f, x: grad(lambda x: f(x).square().sum())(x),
    "vjp": lambda f, x: vjp(f, x),
    "jacrev": lambda f, x: jacrev(f)(x[:2]),
    "jvp": lambda f, x: jvp(f, (x,), (torch.ones_like(x),)),
    "jacfwd": lambda f, x: jacfwd(f)(x[:2]),
    "vmap": lambda f, x: vmap(f)(x.unsqueeze(0).expand((3,) + x.shape)),
}


@pytest.mark.parametrize("torch_cls,ours_cls,shape", CLASSES)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_transform_refusing_tracked_statistics_leaves_buffers(torch_cls, ours_cls, shape,
                                                               transform, momentum):
    # In training with tracked statistics torch refuses every transform here: grad-like ones the
    # in-place count of a captured buffer, vmap the update of unbatched statistics. bn_ext must
    # refuse with the same type, and (unlike torch under vmap, which counts first) leave its
    # running statistics and count exactly as they were, as any call that raises.
    ref, ours = _pair(torch_cls, ours_cls, True, momentum=momentum)
    x = torch.randn(shape, dtype=torch.float64)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    expected = _refusal(lambda: TRANSFORMS[transform](ref, x))
    assert expected is not None, "torch accepted it: compare results instead"
    assert _refusal(lambda: TRANSFORMS[transform](ours, x)) is expected
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    # and the layer still works, counting from where it was
    ours(x)
    assert ours.num_batches_tracked.item() == before["num_batches_tracked"].item() + 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_forward_mode_ad_with_running_statistics(training):
    """bn_ext.batch_norm has no num_batches_tracked: under forward AD it runs torch's batch_norm
    with the caller's momentum, and training updates the running statistics by it."""
    gen = torch.Generator().manual_seed(0)
    x, t = (torch.randn(6, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    w, b = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5, torch.randn(3, generator=gen,
                                                                              dtype=torch.float64)
    stats = (torch.randn(3, generator=gen, dtype=torch.float64),
             torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)
    results = []
    for fn in (torch.nn.functional.batch_norm, bn_ext.batch_norm):
        rm, rv = (s.clone() for s in stats)
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, t), rm, rv, w, b, training, 0.3, 1e-5)
            results.append(tuple(fwAD.unpack_dual(y)) + (rm, rv))
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref)
    if training:
        assert not torch.equal(results[1][2], stats[0])  # the update happened
