"""Bad input: torch's exception types and wording, names in messages, and no buffer touched."""
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bn_ext
from conftest import DEVICES, assert_close


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, before):
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a call that raised"


def _trained(cls, C, device, **kw):
    m = cls(C, device=device, **kw)
    shape = {bn_ext.BatchNorm1d: (4, C), bn_ext.BatchNorm2d: (4, C, 3, 3),
             bn_ext.BatchNorm3d: (4, C, 2, 2, 2)}[cls]
    m(torch.randn(shape, device=device))
    return m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls,bad_shape,message", [
    (bn_ext.BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
    (bn_ext.BatchNorm2d, (2, 3, 4, 4, 4), "expected 4D input (got 5D input)"),
    (bn_ext.BatchNorm1d, (2, 3, 4, 4), "expected 2D or 3D input (got 4D input)"),
    (bn_ext.BatchNorm3d, (2, 3, 4, 4), "expected 5D input (got 4D input)"),
])
def test_wrong_rank(device, cls, bad_shape, message):
    m = _trained(cls, 3, device)
    before = _snapshot(m)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        m(torch.randn(bad_shape, device=device))
    _assert_unchanged(m, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1), (1, 3, 1)])
def test_one_value_per_channel(device, shape):
    cls = {2: bn_ext.BatchNorm1d, 3: bn_ext.BatchNorm1d, 4: bn_ext.BatchNorm2d}[len(shape)]
    m = _trained(cls, 3, device, momentum=None)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training, "
                                         r"got input size torch.Size\(\[1, 3"):
        m(torch.randn(shape, device=device))
    _assert_unchanged(m, before)
    # torch raises the same error, but only after it has counted the batch
    ref = torch.nn.BatchNorm2d(3) if len(shape) == 4 else torch.nn.BatchNorm1d(3)
    with pytest.raises(ValueError):
        ref(torch.randn(shape))
    assert ref.num_batches_tracked.item() == 1
    # eval accepts a single value per channel
    m.eval()
    assert m(torch.randn(shape, device=device)).shape == shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_channel_mismatch_names_argument(device, training):
    m = _trained(bn_ext.BatchNorm2d, 3, device)
    m.train(training)
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match=r"(weight|running_mean|mean) should contain 4 "
                                           r"elements.*got 3"):
        m(torch.randn(2, 4, 3, 3, device=device))
    _assert_unchanged(m, before)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_bad_per_channel_tensors(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    for kwargs, name in [(dict(weight=torch.ones(5, device=device)), "weight"),
                         (dict(bias=torch.ones(2, device=device)), "bias")]:
        with pytest.raises(RuntimeError, match=f"{name} should contain 3 elements"):
            bn_ext.batch_norm(x, rm, rv, training=True, **kwargs)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements"):
        bn_ext.batch_norm(x, torch.zeros(4, device=device), rv, training=True)
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements"):
        bn_ext.batch_norm(x, rm, torch.ones(2, device=device), training=False)
    for training in (True, False):  # C values as a (1, C) matrix: torch refuses them too
        with pytest.raises(RuntimeError, match=r"running_mean must be a 1-D tensor.*\(1, 3\)"):
            bn_ext.batch_norm(x, rm.view(1, 3), rv, training=training)
        with pytest.raises(RuntimeError, match=r"running_var must be a 1-D tensor.*\(3, 1\)"):
            bn_ext.batch_norm(x, rm, rv.view(3, 1), training=training)
    assert torch.equal(rm, torch.zeros(3, device=device))
    assert torch.equal(rv, torch.ones(3, device=device))
    with pytest.raises(ValueError, match="both"):
        bn_ext.batch_norm(x, rm, None, training=True)
    with pytest.raises(TypeError, match="momentum"):
        bn_ext.batch_norm(x, rm, rv, training=True, momentum=None)
    # with momentum=None and another argument wrong, torch's F.batch_norm raises for the batch
    # size or eps first (its argument parser, which refuses None, comes after)
    one = x[:1].flatten(2)[..., :1]
    for args, kw in (((one, None, None), dict(training=True)),
                     ((x, None, None), dict(training=True, eps=0.0)),
                     ((x, rm, rv), dict(training=False, eps=-1.0))):
        with pytest.raises(ValueError):
            torch.nn.functional.batch_norm(*args, momentum=None, **kw)
        with pytest.raises(ValueError):
            bn_ext.batch_norm(*args, momentum=None, **kw)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bn_ext.batch_norm(torch.randn(3, device=device), None, None, training=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_empty_input_checks_its_arguments(device, training):
    # A deliberate difference (README): torch returns before its checks when input.numel() == 0.
    x = torch.randn(0, 3, 4, device=device)
    m = bn_ext.BatchNorm1d(3, device=device).train(training)
    m.weight = torch.nn.Parameter(torch.ones(5, device=device))
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements"):
        m(x)
    _assert_unchanged(m, before)
    ref = torch.nn.BatchNorm1d(3, device=device).train(training)
    ref.weight = torch.nn.Parameter(torch.ones(5, device=device))
    assert ref(x).shape == x.shape  # torch takes it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_zero_channels(device, training, affine):
    # Zero channels is an empty input too, checked like any other and then an empty output (a
    # pruned layer). torch's empty-input path scales by weight[0], an IndexError on an affine
    # layer of zero channels; without weight it returns the empty output, as bn_ext does.
    x = torch.randn(4, 0, 5, device=device, requires_grad=True)
    m = bn_ext.BatchNorm1d(0, affine=affine, device=device).train(training)
    y = m(x)
    assert y.shape == x.shape
    assert m.num_batches_tracked.item() == int(training)
    y.sum().backward()
    assert x.grad.shape == x.shape
    ref = torch.nn.BatchNorm1d(0, affine=affine, device=device).train(training)
    if affine:
        with pytest.raises(IndexError):
            ref(x)
    else:
        assert ref(x).shape == x.shape
    # and its arguments are checked: a weight of the wrong channel count is refused
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match="weight should contain 0 elements"):
        bn_ext.batch_norm(x, m.running_mean, m.running_var, torch.ones(2, device=device),
                          None, training)
    _assert_unchanged(m, before)


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_dtypes(device):
    m = _trained(bn_ext.BatchNorm2d, 3, device)
    before = _snapshot(m)
    with pytest.raises(NotImplementedError, match="input has dtype Int"):
        m(torch.ones(2, 3, 2, 2, dtype=torch.int32, device=device))
    # float64 input with float32 parameters: torch refuses mixed dtypes, so do we, by name
    with pytest.raises(RuntimeError, match="weight has dtype Float which cannot be used with "
                                           "Double input"):
        m(torch.randn(2, 3, 2, 2, dtype=torch.float64, device=device))
    _assert_unchanged(m, before)
    m.eval()
    with pytest.raises(RuntimeError, match="cannot be used with Double input"):
        m(torch.randn(2, 3, 2, 2, dtype=torch.float64, device=device))


# Parameter and buffer dtypes torch refuses (float32 input with float64 running statistics, a
# float16 input with bfloat16 parameters, ...) are refused in training and in eval alike, by name,
# with the running statistics untouched; float32 parameters with a float16/bfloat16 input (autocast)
# stay allowed.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_dtype,buffer_dtype,param_dtype,name", [
    (torch.float32, torch.float64, torch.float32, "running_mean|mean"),  # eval's op: mean
    (torch.float64, torch.float32, torch.float64, "running_mean|mean"),
    (torch.float16, torch.bfloat16, torch.bfloat16, "running_mean|mean|weight"),
    (torch.bfloat16, torch.float32, torch.float16, "weight"),
    (torch.float32, torch.float32, torch.float64, "weight"),
], ids=["fp32-fp64stats", "fp64-fp32stats", "fp16-bf16", "bf16-fp16weight", "fp32-fp64weight"])
def test_mixed_dtypes_refused_as_torch(device, training, x_dtype, buffer_dtype, param_dtype, name):
    x = torch.randn(4, 3, 2, 2, device=device).to(x_dtype)
    rm = torch.zeros(3, device=device, dtype=buffer_dtype)
    rv = torch.ones(3, device=device, dtype=buffer_dtype)
    w = torch.ones(3, device=device, dtype=param_dtype)
    b = torch.zeros(3, device=device, dtype=param_dtype)
    # torch refuses it too (the premise of this test)
    with pytest.raises(RuntimeError):
        torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    with pytest.raises(RuntimeError, match=f"({name}) has dtype .* which cannot be used with"):
        bn_ext.batch_norm(x, rm, rv, w, b, training)
    assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv))
    # the autocast case: float32 parameters and statistics with a float16/bfloat16 input
    if x_dtype in (torch.float16, torch.bfloat16):
        f32 = [t.float() for t in (rm, rv, w, b)]
        y = bn_ext.batch_norm(x, *f32[:2], *f32[2:], training)
        assert y.dtype == x_dtype


def test_mixed_devices_names_argument():
    # A meta tensor stands in for a second device, so this runs without a GPU.
    x = torch.randn(4, 3, 2, 2)
    w = torch.ones(3, device="meta")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="weight is on meta but input is on cpu"):
        bn_ext.batch_norm(x, rm, rv, w, None, True)
    # batch_norm's own check names the caller's argument in training and in eval, where the
    # op (normalize) calls it mean
    for training in (True, False):
        for name in ("running_mean", "running_var"):
            stats = {"running_mean": rm, "running_var": rv, name: torch.ones(3, device="meta")}
            with pytest.raises(RuntimeError, match=f"{name} is on meta but input is on cpu"):
                bn_ext.batch_norm(x, stats["running_mean"], stats["running_var"], None, None,
                                  training)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_cpu_cuda_devices():
    m = bn_ext.BatchNorm2d(3).cuda()
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match="is on cuda"):
        m(torch.randn(2, 3, 2, 2))
    _assert_unchanged(m, before)


def test_input_never_modified_and_output_is_new():
    x = torch.randn(4, 3, 5, 5)
    x_copy = x.clone()
    m = bn_ext.BatchNorm2d(3, affine=False)
    for train in (True, False):
        m.train(train)
        y = m(x)
        assert y.data_ptr() != x.data_ptr()
        assert torch.equal(x, x_copy)


@pytest.mark.skipif(bn_ext.has_cuda_kernels(), reason="this build has the CUDA kernels")
@pytest.mark.parametrize("name", ["batch_stats", "normalize", "train_forward",
                                  "running_stats_update", "backward_reduce", "backward_input",
                                  "normalize_backward", "train_backward"])
def test_cpu_only_build_names_the_missing_cuda_kernels(name):
    # A CPU-only build on a CUDA torch gets CUDA tensors. Its CUDA entries must say why they
    # cannot run, in torch's type for a missing kernel. redispatch to the CUDA key reaches them
    # without a GPU (they look at no argument).
    op = getattr(torch.ops.bn_ext, name).default
    x, v = torch.randn(4, 3, 2, 2), torch.ones(3)
    args = {
        "batch_stats": (x,), "normalize": (x, v, v, None, None, 1e-5),
        "train_forward": (x, None, None, 1e-5),
        "running_stats_update": (v.clone(), v.clone(), None, v, v, torch.tensor(4.0), 0.1),
        "backward_reduce": (x, x, v, v, None, 1e-5),
        "backward_input": (x, x, v, v, None, None, None, None, 1e-5),
        "normalize_backward": (x, x, v, v, None, 1e-5),
        "train_backward": (x, x, v, v, None, 1e-5),
    }[name]
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(NotImplementedError,
                       match=rf"bn_ext\.{name}: got CUDA tensors, but this bn_ext was built "
                             "without its CUDA kernels"):
        op.redispatch(cuda, *args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_checked_as_torch(device, eps):
    # F.batch_norm's ValueError: torch 2.13 refuses eps <= 0 in training and eps < 0 in eval
    # (2.11 refuses eps <= 0 in both, with another message); bn_ext follows 2.13
    m = _trained(bn_ext.BatchNorm2d, 3, device)
    m.eps = eps
    before = _snapshot(m)
    x = torch.randn(4, 3, 3, 3, device=device)
    with pytest.raises(ValueError, match="eps must be positive during training, but got"):
        m(x)
    _assert_unchanged(m, before)
    m.eval()
    if eps < 0:
        with pytest.raises(ValueError, match="eps must be non-negative, but got"):
            m(x)
        with pytest.raises(ValueError):
            torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, eps=eps)
    else:  # eps = 0 is allowed in eval
        m(x)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError):
        torch.nn.functional.batch_norm(x, rm, rv, training=True, eps=eps)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        bn_ext.batch_norm(x, rm, rv, training=True, eps=eps)
    assert torch.equal(rm, torch.zeros(3, device=device))


def _arg_values():
    import decimal
    import fractions

    import numpy as np
    # (argument, value): each taken or refused by torch's parser, which F.batch_norm calls
    return [("training", v) for v in (1, 0.0, None, np.bool_(True), torch.tensor(True))] + [
        (name, v) for name in ("momentum", "eps") for v in (
            "0.1", fractions.Fraction(1, 10), decimal.Decimal("0.1"), np.float32(0.1),
            np.int64(1), np.complex64(0.1), np.complex128(0.1 + 2j), complex(0.1),
            np.array(0.1), np.array([0.1]), torch.tensor(0.1),
            torch.tensor(0.1, requires_grad=True), torch.tensor([0.1]), True, 1)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arg,value", _arg_values(), ids=lambda v: type(v).__name__)
def test_argument_types_as_torch(arg, value, training):
    """torch's parser refuses what is not a bool (training) or a float (momentum, eps: a float,
    int, bool, numpy scalar or 0-d tensor without grad) with a TypeError; float() would take a
    str, a Fraction, a Decimal or a 0-d array. The same values in the modules' attributes."""
    x = torch.randn(6, 3, 2)
    kwargs = {"training": training, "momentum": 0.1, "eps": 1e-5, arg: value}
    outcomes = []
    for fn in (torch.nn.functional.batch_norm, bn_ext.batch_norm):
        rm, rv = torch.zeros(3), torch.ones(3)
        try:
            y = fn(x, rm, rv, **kwargs)
        except TypeError as e:
            outcomes.append((str(e), rm, rv))
        else:
            outcomes.append((y, rm, rv))
    (ref, rm_ref, rv_ref), (ours, rm, rv) = outcomes
    if isinstance(ref, str):
        assert isinstance(ours, str), f"torch refused {arg}={value!r}, bn_ext took it"
        if " must be " in ref:  # the parser's (a str eps fails F.batch_norm's eps > 0 first)
            # the argument and the value's type named as torch names them
            assert ours.split(": ", 1)[1] == re.sub(r" \(position \d+\)", "",
                                                     ref.split(": ", 1)[1]), (ours, ref)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    else:
        assert not isinstance(ours, str), f"torch took {arg}={value!r}, bn_ext refused it"
        assert_close(ours, ref, torch.float32)
        assert_close(rm, rm_ref, torch.float32)
        assert_close(rv, rv_ref, torch.float32)
    if arg == "training":
        return
    # an eps of another type with momentum=None too: the cumulative average's own path
    for momentum in (0.1, None) if arg == "eps" else (0.1,):
        ref_m = torch.nn.BatchNorm1d(3, momentum=momentum).train(training)
        ours_m = bn_ext.BatchNorm1d(3, momentum=momentum).train(training)
        setattr(ref_m, arg, value)
        setattr(ours_m, arg, value)
        before = _snapshot(ours_m)
        try:
            y_ref = ref_m(x)
        except TypeError:
            with pytest.raises(TypeError):  # a str eps fails the eps >= 0 comparison first
                ours_m(x)
            _assert_unchanged(ours_m, before)
        else:
            assert_close(ours_m(x), y_ref, torch.float32)
            assert_close(ours_m.running_mean, ref_m.running_mean, torch.float32)
            assert_close(ours_m.running_var, ref_m.running_var, torch.float32)
            assert int(ours_m.num_batches_tracked) == int(ref_m.num_batches_tracked)


def _refused_values():
    import array
    import collections
    import datetime
    import decimal
    import enum
    import functools
    import io

    class Plain:
        pass

    class Colour(enum.Enum):
        RED = 1

    # builtins, classes defined in Python, static extension types, and extension heap types
    # declared by a spec: re.Pattern, array.array and functools.partial in every version,
    # decimal.Decimal, collections.deque and _io.StringIO from Python 3.13 on
    return ["0.1", b"0.1", [0.1], (0.1,), {0.1}, 0.1j, Plain(), Plain, Colour.RED,
            decimal.Decimal("0.1"), collections.deque(), collections.OrderedDict(),
            datetime.timedelta(1), array.array("d", [0.1]), functools.partial(float, 0.1),
            io.StringIO(), re.compile("x"), range(1), torch.device("cpu"), torch.float32]


@pytest.mark.parametrize("value", _refused_values(), ids=lambda v: type(v).__name__)
def test_refused_type_named_as_torch(value):
    """torch's parser names a refused value's type by CPython's tp_name: bare for builtins and
    classes defined in Python, as declared for extension types. Telling them apart by the
    heap-type flag named re.Pattern 'Pattern', and decimal.Decimal 'Decimal' on Python 3.13."""
    x = torch.randn(6, 3, 2)
    with pytest.raises(TypeError) as ref:
        torch.nn.functional.batch_norm(x, None, None, training=True, momentum=value)
    with pytest.raises(TypeError) as ours:
        bn_ext.batch_norm(x, None, None, training=True, momentum=value)
    expected = re.search(r"must be float, not (.+)$", str(ref.value)).group(1)
    assert str(ours.value).endswith(f"argument 'momentum' must be float, not {expected}"), (
        str(ours.value), str(ref.value))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("value", [[1.0, 1.0, 1.0], 1.0, "abc"], ids=["list", "float", "str"])
def test_non_tensor_arguments_refused_as_torch(training, name, value):
    """torch's parser refuses a tensor argument that is not a Tensor with a TypeError naming it;
    bn_ext raised the op schema's RuntimeError (weight, bias) or an AttributeError from its
    channel-count check (the running statistics). The running statistics stay as they were."""
    x = torch.randn(6, 3, 2)
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": None,
            "bias": None, name: value}
    with pytest.raises(TypeError):
        torch.nn.functional.batch_norm(x, training=training, **args)
    with pytest.raises(TypeError, match=f"argument '{name}' must be Tensor, not "):
        bn_ext.batch_norm(x, training=training, **args)
    for stat, fill in (("running_mean", 0.0), ("running_var", 1.0)):
        if name != stat:
            assert torch.equal(args[stat], torch.full((3,), fill))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("given", ["neither", "running_mean", "running_var"])
def test_eval_without_running_statistics_as_torch(device, given):
    x = torch.randn(4, 3, 2, device=device)
    stats = {"running_mean": torch.zeros(3, device=device),
             "running_var": torch.ones(3, device=device)}
    args = [stats[n] if n == given else None for n in ("running_mean", "running_var")]
    missing = "running_var" if given == "running_mean" else "running_mean"
    for f in (torch.nn.functional.batch_norm, bn_ext.batch_norm):
        with pytest.raises(RuntimeError, match=f"{missing} must be defined in evaluation mode"):
            f(x, *args, training=False)
    if given != "neither":  # in training one without the other is torch's ValueError
        for f in (torch.nn.functional.batch_norm, bn_ext.batch_norm):
            with pytest.raises(ValueError, match="must either both be None or neither be None"):
                f(x, *args, training=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_expanded_running_statistics_refused_before_counting(device, name):
    # A running statistic whose elements share memory cannot be updated in place; it used to
    # fail only after the kernel had counted the batch.
    m = _trained(bn_ext.BatchNorm2d, 3, device)
    setattr(m, name, getattr(m, name)[:1].clone().expand(3))
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match=f"{name} has elements that share memory"):
        m(torch.randn(4, 3, 3, 3, device=device))
    _assert_unchanged(m, before)
    m.eval()  # read only: fine
    m(torch.randn(4, 3, 3, 3, device=device))
    with pytest.raises(RuntimeError, match=f"{name} has elements that share memory"):
        ops = torch.ops.bn_ext
        mean, var = ops.batch_stats(torch.randn(4, 3, 3, 3, device=device))
        ops.running_stats_update(m.running_mean, m.running_var, m.num_batches_tracked, mean, var,
                                 torch.tensor(36.0, device=device), 0.1)
    _assert_unchanged(m, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_statistics_requiring_grad_refused_as_torch(device, training, name):
    # torch refuses a running statistic that requires grad while grad mode is on (it cannot
    # differentiate through it); bn_ext used to update it, or drop its gradient, silently.
    m = _trained(bn_ext.BatchNorm2d, 3, device)
    ref = torch.nn.BatchNorm2d(3, device=device)
    ref.load_state_dict(m.state_dict())
    m.train(training)
    ref.train(training)
    for layer in (m, ref):
        getattr(layer, name).requires_grad_()
    before = _snapshot(m)
    x = torch.randn(4, 3, 3, 3, device=device)
    with pytest.raises(RuntimeError) as expected:
        ref(x)
    assert name in str(expected.value)
    with pytest.raises(RuntimeError, match=f"{name} requires grad"):
        m(x)
    _assert_unchanged(m, before)
    with pytest.raises(RuntimeError, match=f"{name} requires grad"):
        bn_ext.batch_norm(x, m.running_mean, m.running_var, training=training)
    _assert_unchanged(m, before)
    # Without grad mode torch accepts it (and, training, updates it): so does bn_ext.
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    # torch counted the batch it then refused in training (see test_one_value_per_channel)
    assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() - training


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", ["BatchNorm2d", "SyncBatchNorm"])
def test_count_requiring_grad_refused_as_torch(device, cls):
    # A float num_batches_tracked that requires grad: torch's forward counts with add_(1), which
    # autograd refuses for a leaf that requires grad (grad mode on), before anything else runs;
    # bn_ext counts inside the op, out of autograd's sight, and used to count it silently.
    # (SyncBatchNorm without a process group; torch's refuses CPU input before it counts.)
    m, ref = getattr(bn_ext, cls)(3, device=device), torch.nn.BatchNorm2d(3, device=device)
    for layer in (m, ref):
        layer.num_batches_tracked = torch.tensor(2.0, device=device, requires_grad=True)
    x = torch.randn(4, 3, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ref(x)
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        m(x)
    _assert_unchanged(m, before)
    # Without grad mode torch counts it, and so does bn_ext; eval counts nothing.
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))
    for layer in (m, ref):
        assert layer.num_batches_tracked.item() == 3.0
        layer.eval()
        layer(x)
        assert layer.num_batches_tracked.item() == 3.0
    torch.testing.assert_close(m.running_mean, ref.running_mean)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_inference_tensor_buffers_updated_only_in_inference_mode(device, grad):
    # A layer built under torch.inference_mode() holds inference tensors: torch refuses to update
    # them outside inference mode (RuntimeError), and bn_ext used to update them anyway (or,
    # with grad, update them and then raise).
    with torch.inference_mode():
        m = bn_ext.BatchNorm2d(3, device=device)
        ref = torch.nn.BatchNorm2d(3, device=device)
    x = torch.randn(4, 3, 3, 3, device=device) + 5
    before = _snapshot(m)
    with torch.set_grad_enabled(grad):
        with pytest.raises(RuntimeError, match="inference tensor"):
            ref(x)
        with pytest.raises(RuntimeError, match="running_mean is an inference tensor"):
            m(x)
    _assert_unchanged(m, before)
    mean, var = torch.ops.bn_ext.batch_stats(x)
    with pytest.raises(RuntimeError, match="running_mean is an inference tensor"):
        torch.ops.bn_ext.running_stats_update(m.running_mean, m.running_var,
                                              m.num_batches_tracked, mean, var,
                                              torch.tensor(36.0, device=device), 0.1)
    _assert_unchanged(m, before)
    # Inside inference mode both train; eval reads the buffers anywhere.
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref(x))
        torch.testing.assert_close(m.running_mean, ref.running_mean)
        assert m.num_batches_tracked.item() == 1
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("name", ["running_mean", "running_var", "num_batches_tracked"])
@pytest.mark.parametrize("op", ["train_forward", "running_stats_update"])
def test_negative_bit_buffers_refused(op, name):
    # torch's Negative fallback assumes a mutated argument is also the op's first output; for
    # these ops it read past the dispatcher's stack (a segfault) or raised after writing
    buffers = {"running_mean": torch.zeros(3), "running_var": torch.ones(3),
               "num_batches_tracked": torch.tensor(2)}
    buffers[name] = torch._neg_view(-buffers[name])
    before = {k: v.clone() for k, v in buffers.items()}
    x = torch.randn(8, 3)
    mean, var = torch.ops.bn_ext.batch_stats(x)
    with pytest.raises(RuntimeError, match=f"{name} is a negative-bit view"):
        if op == "train_forward":
            torch.ops.bn_ext.train_forward(x, None, None, 1e-5, *buffers.values(), 0.1)
        else:
            torch.ops.bn_ext.running_stats_update(*buffers.values(), mean, var,
                                                  torch.tensor(8.0), 0.1)
    for k, v in buffers.items():
        assert torch.equal(v, before[k]), k


def test_negative_bit_read_only_arguments_resolved():
    x, w, b = torch.randn(8, 3, 2), torch.rand(3) + 0.5, torch.randn(3)
    neg = lambda t: torch._neg_view(-t)  # noqa: E731  (same values, negative bit set)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    got = torch.ops.bn_ext.train_forward(neg(x), neg(w), neg(b), 1e-5, rm, rv, nbt, 0.1)
    rm2, rv2, nbt2 = torch.zeros(3), torch.ones(3), torch.tensor(0)
    want = torch.ops.bn_ext.train_forward(x, w, b, 1e-5, rm2, rv2, nbt2, 0.1)
    for a, e in zip(got + (rm, rv, nbt), want + (rm2, rv2, nbt2)):
        assert torch.equal(a, e)
    mean, var = want[1], want[2]
    torch.ops.bn_ext.running_stats_update(rm, rv, nbt, neg(mean), neg(var),
                                          neg(torch.tensor(16.0)), 0.1)
    torch.ops.bn_ext.running_stats_update(rm2, rv2, nbt2, mean, var, torch.tensor(16.0), 0.1)
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2) and torch.equal(nbt, nbt2)


_GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
               "grad": torch.enable_grad}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(_GRAD_MODES))
@pytest.mark.parametrize("stats_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_training_update_leaves_version_counters_alone(device, mode, stats_dtype):
    # torch's batch_norm writes the running statistics without bumping their version counters,
    # so an eval graph that saved them still backpropagates after a training step; bn_ext's
    # kernels write them directly, and its write-back of converted (bf16) statistics must not
    # bump them either (under inference_mode it did: copy_ went through ADInplaceOrView).
    m = bn_ext.BatchNorm1d(3, device=device, dtype=stats_dtype).eval()
    x = torch.randn(4, 3, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    versions = [t._version for t in (m.running_mean, m.running_var)]
    m.train()
    ctx = _GRAD_MODES[mode]
    before = m.running_var.clone()
    with ctx():
        m(torch.randn(4, 3, device=device, dtype=torch.bfloat16))
    assert not torch.equal(m.running_var, before)  # it was updated
    assert [t._version for t in (m.running_mean, m.running_var)] == versions
    y.float().sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(_GRAD_MODES))
@pytest.mark.parametrize("batch", [4, 0], ids=["batch", "empty"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_counting_a_batch_bumps_its_version_as_torch(device, mode, batch, momentum):
    # torch's modules count with num_batches_tracked.add_(1), one version bump a training call;
    # the running statistics keep theirs (the test above)
    ctx = _GRAD_MODES[mode]
    x = torch.randn(batch, 3, 5, device=device, requires_grad=mode == "grad")
    bumps = []
    for lib in (torch.nn, bn_ext):
        m = lib.BatchNorm1d(3, momentum=momentum, device=device)
        before = [t._version for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
        with ctx():
            m(x)
            m(x)
        after = [t._version for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
        assert int(m.num_batches_tracked) == 2
        bumps.append([a - b for a, b in zip(after, before)])
    assert bumps[1] == bumps[0] == [0, 0, 2], f"torch {bumps[0]}, bn_ext {bumps[1]}"


def _module_one_value_wrong_channels(lib):
    return lib.BatchNorm1d(4)(torch.randn(1, 5))


def _module_eval_no_var_negative_eps(lib):
    m = lib.BatchNorm1d(3).eval()
    m.running_var, m.eps = None, -1e-3
    return m(torch.randn(4, 3))


def _functional_wrong_stats_zero_eps(lib):
    fn = bn_ext.batch_norm if lib is bn_ext else torch.nn.functional.batch_norm
    return fn(torch.randn(4, 3), torch.zeros(2), torch.ones(2), training=True, eps=0.0)


def _functional_one_statistic_wrong_weight(lib):
    fn = bn_ext.batch_norm if lib is bn_ext else torch.nn.functional.batch_norm
    return fn(torch.randn(4, 3), None, torch.ones(3), torch.ones(5), training=True)


def _functional_one_statistic_wrong_bias(lib):
    fn = bn_ext.batch_norm if lib is bn_ext else torch.nn.functional.batch_norm
    return fn(torch.randn(4, 3), torch.zeros(3), None, None, torch.zeros(2), training=True)


def _functional_one_statistic_wrong_channels(lib):
    fn = bn_ext.batch_norm if lib is bn_ext else torch.nn.functional.batch_norm
    return fn(torch.randn(4, 3), None, torch.ones(2), training=True)


def _functional_one_statistic_as_row(lib):
    fn = bn_ext.batch_norm if lib is bn_ext else torch.nn.functional.batch_norm
    return fn(torch.randn(4, 3), torch.zeros(1, 3), None, training=True)


def _functional_integer_input_row_statistics(lib):
    fn = bn_ext.batch_norm if lib is bn_ext else torch.nn.functional.batch_norm
    return fn(torch.randint(0, 3, (4, 3)), torch.zeros(1, 3), torch.ones(1, 3), training=True)


@pytest.mark.parametrize("call,error,name", [
    (_module_one_value_wrong_channels, ValueError, "more than 1 value"),
    (_module_eval_no_var_negative_eps, ValueError, "eps"),
    (_functional_wrong_stats_zero_eps, ValueError, "eps"),
    (_functional_one_statistic_wrong_weight, RuntimeError, "weight"),
    (_functional_one_statistic_wrong_bias, RuntimeError, "bias"),
    (_functional_one_statistic_wrong_channels, RuntimeError, "running_var"),
    (_functional_one_statistic_as_row, ValueError, "both be None"),  # before their 1-D check
    (_functional_integer_input_row_statistics, NotImplementedError, "Long"),  # so is the dtype
])
def test_several_wrong_arguments_raise_torchs_first_error(call, error, name):
    # torch's F.batch_norm checks the batch size and eps (ValueError) before its kernel checks
    # the channel counts of the running statistics, weight and bias (RuntimeError), and those
    # before it pairs running_mean with running_var (ValueError); with several wrong, the error is
    # torch's first.
    with pytest.raises(Exception) as ref:
        call(torch.nn)
    with pytest.raises(Exception) as ours:
        call(bn_ext)
    assert type(ours.value) is type(ref.value) is error
    assert name in str(ours.value) and name in str(ref.value)


# ---- random calls, wrong arguments among them, against torch -------------------------------
#
# Each argument is drawn right or wrong in one of the ways a caller gets it wrong; torch decides
# what is an error. Where torch raises, bn_ext raises the same type and leaves every buffer as it
# was; where torch accepts, bn_ext returns torch's output and buffers. bn_ext follows torch 2.13's
# checks (2.11 also refuses eps = 0 in eval, for one), so the reference must be 2.13 or later.
_TORCH_AS_BN_EXT = pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13),
    reason="bn_ext's argument checks follow torch 2.13's")

# "row" and "column" are (1, C) and (C, 1) matrices: torch takes them as weight and bias (it counts
# C values) and refuses them as running statistics (its kernels read those as 1-D).
_VECTOR_KINDS = [None, "ok", "ok", "strided", "fewer", "more", "float64", "bfloat16", "float16",
                 "row", "column"]


def _vector(kind, C, fill):
    """A per-channel vector of the drawn kind (None: absent), values from fill(n)."""
    if kind is None:
        return None
    n = {"fewer": C - 1, "more": C + 1}.get(kind, C)
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16}.get(kind, torch.float32)
    if kind == "strided":
        return fill(2 * n).to(dtype)[::2]
    if kind in ("row", "column"):
        return fill(n).to(dtype).reshape((1, n) if kind == "row" else (n, 1))
    return fill(n).to(dtype)


@st.composite
def _functional_calls(draw):
    ndim = draw(st.integers(2, 4))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)),
             *[draw(st.integers(1, 2)) for _ in range(ndim - 2)])
    x_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    kinds = {name: draw(st.sampled_from(_VECTOR_KINDS))
             for name in ("weight", "bias", "running_mean", "running_var")}
    training = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-5, 0.0, -1e-3]))
    momentum = draw(st.sampled_from([0.1, 1.0]))
    return shape, x_dtype, kinds, training, eps, momentum


def _outcome(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return None, e


def _assert_same_outcome(ref, ours, ref_tensors, our_tensors, before, dtype):
    (ref_out, ref_err), (our_out, our_err) = ref, ours
    if ref_err is not None:
        assert our_err is not None, f"torch raised {ref_err!r}; bn_ext returned"
        assert type(our_err) is type(ref_err), f"torch: {ref_err!r}\nbn_ext: {our_err!r}"
        for name, t in our_tensors.items():
            assert t is None or torch.equal(t, before[name]), f"{name} changed by a rejected call"
        return
    assert our_err is None, f"torch returned; bn_ext raised {our_err!r}"
    assert our_out.dtype == ref_out.dtype and our_out.shape == ref_out.shape
    assert_close(our_out, ref_out, dtype)
    for name, t in our_tensors.items():
        if t is not None:
            assert t.dtype == ref_tensors[name].dtype
            assert_close(t.float(), ref_tensors[name].float(),
                         torch.bfloat16 if t.dtype in (torch.bfloat16, torch.float16) else dtype,
                         msg=name)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("low", ["running_var", "running_mean", "weight", "bias"])
def test_mixed_parameter_dtypes_among_themselves(low, dtype, training):
    """With a reduced-precision input, torch's CPU kernel takes the parameters and running
    statistics in float32 or in the input's dtype, but all in the same one. One of them in the
    input's dtype among float32 others is refused (RuntimeError), and nothing is written."""
    x = torch.randn(4, 3).to(dtype)
    tensors = {"running_mean": torch.zeros(3), "running_var": torch.ones(3),
               "weight": torch.rand(3) + 0.5, "bias": torch.randn(3)}
    tensors[low] = tensors[low].to(dtype)
    before = {k: t.clone() for k, t in tensors.items()}

    def call(fn):
        return fn(x, tensors["running_mean"], tensors["running_var"], tensors["weight"],
                  tensors["bias"], training=training)

    with pytest.raises(RuntimeError):  # "mixed dtype", or a scalar type expected, as it falls
        call(torch.nn.functional.batch_norm)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        call(bn_ext.batch_norm)
    for k, t in tensors.items():
        assert torch.equal(t, before[k]), k
    # All float32, or all the input's dtype, runs.
    for pd in (torch.float32, dtype):
        for k in tensors:
            tensors[k] = before[k].to(pd)
        call(bn_ext.batch_norm)


@_TORCH_AS_BN_EXT
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_functional_calls())
def test_random_functional_calls_as_torch(call):
    shape, x_dtype, kinds, training, eps, momentum = call
    C = shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(x_dtype)
    fills = {"weight": lambda n: torch.rand(n, generator=g) + 0.5,
             "bias": lambda n: torch.randn(n, generator=g),
             "running_mean": lambda n: torch.randn(n, generator=g),
             "running_var": lambda n: torch.rand(n, generator=g) + 0.5}
    tensors = {name: _vector(kind, C, fills[name]) for name, kind in kinds.items()}
    before = {k: None if t is None else t.clone() for k, t in tensors.items()}
    ref_tensors = {k: None if t is None else t.clone() for k, t in tensors.items()}

    def call_with(fn, ts):
        return lambda: fn(x, ts["running_mean"], ts["running_var"], ts["weight"], ts["bias"],
                          training=training, momentum=momentum, eps=eps)

    ref = _outcome(call_with(torch.nn.functional.batch_norm, ref_tensors))
    ours = _outcome(call_with(bn_ext.batch_norm, tensors))
    _assert_same_outcome(ref, ours, ref_tensors, tensors, before, x_dtype)


@st.composite
def _module_calls(draw):
    ndim = draw(st.integers(2, 5))
    # C >= 2, so that "fewer" channels never makes an empty input: torch checks nothing for one
    # (it returns early), bn_ext still checks the channel counts (a known deviation)
    C = draw(st.integers(2, 3))
    shape = [draw(st.integers(1, 3)), C, *[draw(st.integers(1, 2)) for _ in range(ndim - 2)]]
    channels = draw(st.sampled_from(["right", "right", "fewer", "more"]))
    shape[1] += {"right": 0, "fewer": -1, "more": 1}[channels]
    cls = draw(st.sampled_from(["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]))
    options = dict(affine=draw(st.booleans()), track_running_stats=draw(st.booleans()),
                   momentum=draw(st.sampled_from([0.1, None])))
    training = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-5, 0.0, -1e-3]))
    stats_none = draw(st.booleans())  # running stats set to None after construction
    return cls, C, tuple(shape), options, training, eps, stats_none


@_TORCH_AS_BN_EXT
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_module_calls())
def test_random_module_calls_as_torch(call):
    cls, C, shape, options, training, eps, stats_none = call
    # SyncBatchNorm without a process group is BatchNorm over any rank >= 2
    ref = getattr(torch.nn, cls)(C, eps=eps, **options)
    ours = getattr(bn_ext, cls)(C, eps=eps, **options)
    with torch.no_grad():
        for m in (ref, ours):
            if m.running_mean is not None:
                m.running_mean.copy_(torch.linspace(-1, 1, C))
                m.running_var.copy_(torch.linspace(0.5, 2, C))
                m.num_batches_tracked.fill_(3)
            if stats_none:
                m.running_mean = m.running_var = None
            m.train(training)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ref_result, ours_result = _outcome(lambda: ref(x)), _outcome(lambda: ours(x))
    _assert_same_outcome(ref_result, ours_result, dict(ref.state_dict()),
                         dict(ours.state_dict()), before, torch.float32)
