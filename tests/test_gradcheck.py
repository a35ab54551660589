"""gradcheck and gradgradcheck in float64, training and eval, through the public API."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import bn_ext
from conftest import DEVICES, make_input


def _inputs(shape, layout, device, affine):
    x = make_input(shape, torch.float64, device, layout).requires_grad_()
    C = shape[1]
    w = (torch.rand(C, dtype=torch.float64, device=device) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=torch.float64, device=device).requires_grad_() if affine else None
    return x, w, b


def _fn(training, device, C):
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5

    def f(x, w, b):
        # Fresh copies: training updates the running statistics in place.
        return bn_ext.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (5, 2), (3, 2, 4), (2, 2, 2, 2, 3)])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradcheck(device, training, layout, shape, affine):
    x, w, b = _inputs(shape, layout, device, affine)
    f = _fn(training, device, shape[1])
    args = (x, w, b)
    assert gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (6, 2)])
def test_gradgradcheck(device, training, layout, shape):
    x, w, b = _inputs(shape, layout, device, True)
    f = _fn(training, device, shape[1])
    assert gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_module_gradcheck(device):
    m = bn_ext.BatchNorm2d(3, device=device, dtype=torch.float64)
    x = make_input((4, 3, 2, 3), torch.float64, device).requires_grad_()
    assert gradcheck(lambda t: m(t), (x,), eps=1e-6, atol=1e-6)


class _OpLog(TorchDispatchMode):
    """The ops that reach the dispatcher's Python key, by name (a composite op shows as the
    ATen ops it is made of)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# The kernels a first-order backward runs, by mode and by which of (x, w, b) take a gradient.
_BACKWARD_KERNELS = {
    (True, "all"): ["bn_ext.train_backward.default"],
    (True, "params"): ["bn_ext.backward_reduce.default"],
    (False, "all"): ["bn_ext.normalize_backward.default"],
    (False, "input"): ["bn_ext.backward_input.default"],
    (False, "params"): ["bn_ext.backward_reduce.default"],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["batch_norm", "BatchNormFunction"])
@pytest.mark.parametrize("training,needs", list(_BACKWARD_KERNELS),
                         ids=lambda v: v if isinstance(v, str) else "train" if v else "eval")
def test_backward_runs_in_cpp(device, path, training, needs):
    """A first-order backward runs the C++ kernels alone (the torch-op formula is for double
    backward), one op where there is one for the gradients asked; with create_graph it runs the
    torch ops instead."""
    x, w, b = _inputs((4, 3, 2, 2), "contiguous", device, True)
    x.requires_grad_(needs != "params")
    w.requires_grad_(needs != "input")
    b.requires_grad_(needs != "input")
    dy = torch.randn_like(x)
    if path == "batch_norm":
        f = _fn(training, device, 3)
    else:
        rm = torch.randn(3, dtype=torch.float64, device=device)
        rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5

        def f(x, w, b):
            return bn_ext.BatchNormFunction.apply(x, w, b, rm.clone(), rv.clone(), training,
                                                  1e-3, None, 0.1)[0]
    wanted = [t for t in (x, w, b) if t.requires_grad]
    y = f(x, w, b)
    with _OpLog() as log:
        torch.autograd.grad(y, wanted, dy)
    assert sorted(op for op in log.ops if op != "aten.detach.default") == \
        _BACKWARD_KERNELS[training, needs]
    y = f(x, w, b)
    with _OpLog() as log:
        torch.autograd.grad(y, wanted, dy, create_graph=True)
    assert "aten.rsqrt.default" in log.ops and not any(op.startswith("bn_ext.") for op in log.ops)


def _batch_norm_via(path, training):
    """bn_ext.batch_norm, or BatchNormFunction, as f(x, weight, bias, running_mean, running_var),
    with momentum 0.1 and eps 1e-3."""
    def f(x, w, b, rm, rv):
        if path == "batch_norm":
            return bn_ext.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-3)
        return bn_ext.BatchNormFunction.apply(x, w, b, rm, rv, training, 1e-3, None, 0.1)[0]
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["batch_norm", "BatchNormFunction"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad_of", ["x", "w", "b", "xw", "xb", "wb", "xwb"])
def test_gradients_of_what_requires_grad(device, path, training, grad_of):
    """Each subset of (input, weight, bias) requiring grad, the others not: the backward takes a
    different branch (fused op, reduction alone, input alone) for each, and every one gives
    torch's gradients, and no gradient to what does not require it."""
    x, w, b = _inputs((4, 3, 3, 2), "contiguous", device, True)
    for name, t in zip("xwb", (x, w, b)):
        t.requires_grad_(name in grad_of)
    dy = torch.randn_like(x)
    rm = torch.randn(3, dtype=torch.float64, device=device)
    rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    wanted = [t for t in (x, w, b) if t.requires_grad]
    f = _batch_norm_via(path, training)
    ref = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)
    for ours, theirs in zip(torch.autograd.grad(f(x, w, b, rm.clone(), rv.clone()), wanted, dy),
                            torch.autograd.grad(ref, wanted, dy)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    f(x, w, b, rm.clone(), rv.clone()).backward(dy)
    assert all((t.grad is None) == (name not in grad_of) for name, t in zip("xwb", (x, w, b)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training,asked,kernels", [
    (True, "x", ["bn_ext.train_backward.default"]),
    (True, "wb", ["bn_ext.backward_reduce.default"]),
    (False, "x", ["bn_ext.backward_input.default"]),
    (False, "wb", ["bn_ext.backward_reduce.default"]),
    (False, "xw", ["bn_ext.normalize_backward.default"]),
])
def test_backward_computes_only_the_gradients_asked(device, training, asked, kernels):
    """x, weight and bias all require grad, and autograd.grad asks for some of them: the layers'
    C++ autograd runs the kernels for those alone (an input-gradient attack on an eval model
    reads dy once, not dy and x twice), and the gradients are torch's."""
    x, w, b = _inputs((4, 3, 3, 2), "contiguous", device, True)
    dy = torch.randn_like(x)
    rm = torch.randn(3, dtype=torch.float64, device=device)
    rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    wanted = [{"x": x, "w": w, "b": b}[k] for k in asked]
    y = bn_ext.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)
    with _OpLog() as log:
        grads = torch.autograd.grad(y, wanted, dy)
    assert sorted(op for op in log.ops if op != "aten.detach.default") == kernels
    ref = torch.autograd.grad(torch.nn.functional.batch_norm(
        x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3), wanted, dy)
    for ours, theirs in zip(grads, ref):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "weight_grad"])
def test_eval_input_gradient_penalty_as_torch(device, frozen):
    # An input-gradient penalty through an eval layer: grad_input = dy * w * invstd is constant
    # in x, yet torch's requires grad (x is an argument of its backward), and the second
    # backward gives x no gradient. With frozen parameters bn_ext's used to need no graph at all,
    # so the second backward raised.
    def run(lib):
        torch.manual_seed(0)
        m = lib.BatchNorm2d(3, device=device, dtype=torch.float64)
        m(torch.randn(4, 3, 2, 2, device=device, dtype=torch.float64))
        m.eval().requires_grad_(not frozen)
        x = torch.randn(4, 3, 2, 2, device=device, dtype=torch.float64, requires_grad=True)
        dy = torch.randn_like(x)
        (g,) = torch.autograd.grad(m(x), x, dy, create_graph=True)
        assert g.requires_grad
        g.pow(2).sum().backward()
        return g.detach(), x.grad, m.weight.grad

    ours, ref = run(bn_ext), run(torch.nn)
    for a, b in zip(ours, ref):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm_function_gradgradcheck(device, training, affine):
    """BatchNormFunction, public, has its own backward (batch_norm's training runs the C++
    autograd instead): its first and second derivatives, checked the same way."""
    x, w, b = _inputs((4, 3, 2, 2), "channels_last", device, affine)
    rm = torch.randn(3, dtype=torch.float64, device=device)
    rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5

    def f(x, w, b):
        return bn_ext.BatchNormFunction.apply(x, w, b, rm.clone(), rv.clone(), training,
                                              1e-3, None, 0.1)[0]
    args = (x, w, b) if affine else (x,)
    g = f if affine else (lambda x: f(x, None, None))
    assert gradcheck(g, args, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(g, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["batch_norm", "BatchNormFunction"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout,shape", [("contiguous", (4, 3, 3, 2)),
                                          ("channels_last", (3, 2, 4)), ("contiguous", (5, 2))])
def test_double_backward_values_match_torch(device, path, training, affine, layout, shape):
    """gradgradcheck differentiates the create_graph backward numerically and analytically, both
    from that backward's own formula, so a formula that is wrong but smooth passes it (computing
    var around x + mean did). Here its values: the first derivatives under create_graph=True
    (the torch-op formulas) are the C++ backward's and torch's, and the second derivatives of a
    nonlinear function of them, with respect to x, weight, bias and dy, are torch's."""
    x, w, b = _inputs(shape, layout, device, affine)
    dy = torch.randn_like(x).requires_grad_()
    rm = torch.randn(shape[1], dtype=torch.float64, device=device)
    rv = torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5
    leaves = [t for t in (x, w, b) if t is not None]

    def derivatives(forward, create_graph):
        y = forward(x, w, b, rm.clone(), rv.clone())
        first = torch.autograd.grad(y, leaves, dy, create_graph=create_graph)
        if not create_graph:
            return first
        loss = sum((g * torch.cos(g)).sum() for g in first)
        return first + torch.autograd.grad(loss, leaves + [dy], allow_unused=True,
                                           materialize_grads=True)

    ours = _batch_norm_via(path, training)

    def theirs(x, w, b, rm, rv):
        return torch.nn.functional.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-3)

    got, want = derivatives(ours, True), derivatives(theirs, True)
    first_order = derivatives(ours, False)
    for i, (g, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9, msg=f"derivative {i}")
    for g, r in zip(got, first_order):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_normalize_op_double_backward_values(device, layout, affine):
    """The op normalize differentiates with respect to mean and var too: its first and second
    derivatives under create_graph=True against the same function in torch ops (gradgradcheck
    alone passed a grad_var twice too large)."""
    x, w, b = _inputs((4, 3, 5, 2), layout, device, affine)
    mean = torch.randn(3, dtype=torch.float64, device=device).requires_grad_()
    var = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    dy = torch.randn_like(x).requires_grad_()
    leaves = [t for t in (x, mean, var, w, b) if t is not None]
    per = (1, -1, 1, 1)

    def derivatives(y):
        first = torch.autograd.grad(y, leaves, dy, create_graph=True)
        loss = sum((g * torch.cos(g)).sum() for g in first)
        return first + torch.autograd.grad(loss, leaves + [dy], allow_unused=True,
                                           materialize_grads=True)

    got = derivatives(torch.ops.bn_ext.normalize(x, mean, var, w, b, 1e-3))
    ref = (x - mean.view(per)) / (var.view(per) + 1e-3).sqrt()
    if affine:
        ref = ref * w.view(per) + b.view(per)
    for i, (g, r) in enumerate(zip(got, derivatives(ref))):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9, msg=f"derivative {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_one_training_double_backward(device):
    """BatchNormFunction's training double backward and batch_norm's (train_forward's C++
    autograd) run one formula, the op _differentiable_train_backward: the same bits."""
    x, w, b = _inputs((4, 3, 2, 2), "contiguous", device, True)
    dy = torch.randn_like(x)

    def second_derivatives(forward):
        y = forward(x, w, b)
        gx, gw = torch.autograd.grad(y, (x, w), dy, create_graph=True)
        return (gx, gw) + torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w))

    ours = second_derivatives(lambda x, w, b: bn_ext.BatchNormFunction.apply(
        x, w, b, None, None, True, 1e-3)[0])
    ref = second_derivatives(lambda x, w, b: bn_ext.batch_norm(x, None, None, w, b, True,
                                                               0.1, 1e-3))
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_normalize_op_gradgradcheck(device, layout, affine):
    """The op normalize, called directly, differentiates with respect to every tensor it takes,
    mean and var too (its C++ autograd; batch_norm refuses running statistics that require
    grad, as torch does)."""
    x, w, b = _inputs((4, 3, 5, 2), layout, device, affine)
    mean = torch.randn(3, dtype=torch.float64, device=device).requires_grad_()
    var = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()

    def f(x, mean, var, *wb):
        return torch.ops.bn_ext.normalize(x, mean, var, *(wb or (None, None)), 1e-3)
    args = (x, mean, var) + ((w, b) if affine else ())
    assert gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)
