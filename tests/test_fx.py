"""torch.fx symbolic tracing: a bn_ext layer is a leaf (one call_module node), as torch's own
BatchNorm is, so a traced model has torch's graph and keeps bn_ext's layers running. And
TorchScript: torch.jit.trace records bn_ext's ops; torch.jit.script is refused, clearly."""
import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import bn_ext


class Block(nn.Module):
    def __init__(self, bn_cls, conv_cls, C):
        super().__init__()
        self.conv = conv_cls(3, C, 3, padding=1)
        self.inner = nn.Sequential(bn_cls(C))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.inner(self.conv(x))) + x.mean()


CASES = [(nn.BatchNorm1d, bn_ext.BatchNorm1d, nn.Conv1d, (4, 3, 9)),
         (nn.BatchNorm2d, bn_ext.BatchNorm2d, nn.Conv2d, (4, 3, 5, 6)),
         (nn.BatchNorm3d, bn_ext.BatchNorm3d, nn.Conv3d, (2, 3, 3, 4, 5))]


def _graph(gm):
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


@pytest.mark.parametrize("torch_cls,ours_cls,conv_cls,shape", CASES,
                         ids=["1d", "2d", "3d"])
def test_symbolic_trace_keeps_the_layer_as_a_leaf(torch_cls, ours_cls, conv_cls, shape):
    torch.manual_seed(0)
    ref = Block(torch_cls, conv_cls, 5)
    ours = Block(ours_cls, conv_cls, 5)
    ours.load_state_dict(ref.state_dict())
    gm_ref, gm = torch.fx.symbolic_trace(ref), torch.fx.symbolic_trace(ours)
    assert _graph(gm) == _graph(gm_ref)
    assert ("call_module", "inner.0") in _graph(gm)
    assert type(gm.get_submodule("inner.0")) is ours_cls
    # The graph calls the layer: training's batch statistics and running-stats updates, then
    # eval (switched after tracing) with the running statistics, as torch's traced model does.
    x = torch.randn(shape, requires_grad=True)
    for training in (True, True, False):
        gm_ref.train(training)
        gm.train(training)
        y_ref, y = gm_ref(x), gm(x)
        torch.testing.assert_close(y, y_ref)
        g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
        g, = torch.autograd.grad(y.square().sum(), x)
        torch.testing.assert_close(g, g_ref)
    for k, v in gm_ref.state_dict().items():
        torch.testing.assert_close(gm.state_dict()[k], v, msg=k)
    assert gm.get_submodule("inner.0").num_batches_tracked.item() == 2
    # Bad input still fails when the graph runs, with the layer's own check.
    with pytest.raises(RuntimeError, match="running_mean should contain 7 elements.*got 5"):
        gm.get_submodule("inner.0")(torch.randn((shape[0], 7) + shape[2:]))


def test_sync_batchnorm_traced_as_a_leaf():
    # torch.nn.SyncBatchNorm is a leaf (it is in torch.nn); bn_ext's, without a process group,
    # runs as BatchNorm when the graph runs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn_ext.SyncBatchNorm(4))
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
    ref.load_state_dict(model.state_dict())
    gm = torch.fx.symbolic_trace(model)
    assert _graph(gm) == _graph(torch.fx.symbolic_trace(ref))
    ref_bn = nn.BatchNorm2d(4)
    ref_bn.load_state_dict(ref[1].state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(gm(x), ref_bn(ref[0](x)))
    torch.testing.assert_close(gm.get_submodule("1").running_mean, ref_bn.running_mean)


def test_root_layer_traced_into_as_torch():
    # Only a layer inside the traced module becomes a leaf; tracing the layer itself goes into
    # its forward, whose input checks fail on the Proxy exactly as torch's do.
    with pytest.raises(Exception) as expected:
        torch.fx.symbolic_trace(nn.BatchNorm2d(3))
    with pytest.raises(type(expected.value)):
        torch.fx.symbolic_trace(bn_ext.BatchNorm2d(3))


def test_fx_fuse_and_custom_tracer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn_ext.BatchNorm2d(8), nn.ReLU())
    model(torch.randn(4, 3, 8, 8))  # running statistics away from their initial values
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fuse(model)(x), model(x))

    class Recorder(torch.fx.Tracer):
        """A tracer that overrides create_proxy, as torchvision's feature extractor does."""
        def __init__(self):
            super().__init__()
            self.made = []

        def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
            self.made.append((kind, target))
            return super().create_proxy(kind, target, args, kwargs, *rest, **kw)

    tracer = Recorder()
    tracer.trace(model)
    assert ("call_module", "1") in tracer.made


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_jit_trace_records_the_ops_and_runs_as_torchs(training, grad):
    # Traced with or without grad mode, then run with grad at another shape: the trace's own
    # check run must pass (in eval with grad it failed while eval's autograd was a Python
    # Function), and the traced layer must give torch's traced layer's outputs, gradients and
    # buffers (both ran the same calls: tracing runs the layer more than once).
    def run(cls):
        torch.manual_seed(0)
        m = cls(3).train(training)
        with torch.no_grad():
            m.running_mean.uniform_()
            m.running_var.uniform_(1, 2)
            m.weight.uniform_()
            m.bias.uniform_()
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(m, torch.randn(4, 3, 5, 6))
        x = torch.randn(8, 3, 7, 2, requires_grad=True)
        y = traced(x)
        y.square().sum().backward()
        return traced, (y, x.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var,
                        m.num_batches_tracked)

    traced, ours = run(bn_ext.BatchNorm2d)
    _, ref = run(nn.BatchNorm2d)
    op = "bn_ext::train_forward" if training else "bn_ext::normalize"
    assert op in str(traced.graph)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_jit_script_refused_with_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(bn_ext.BatchNorm2d(4)))
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile bn_ext.BatchNorm2d"
                                           r".*torch.compile, torch.export and torch.jit.trace"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match="cannot compile bn_ext.SyncBatchNorm"):
        torch.jit.script(bn_ext.SyncBatchNorm(4))
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))  # torch's scripts
