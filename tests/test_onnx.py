"""ONNX export of models with bn_ext layers: both exporters (torch.export's, the default, and the
TorchScript one, dynamo=False), in eval and in training.

An ONNX graph runs on its runtime's BatchNormalization, not on bn_ext's kernels, so bn_ext hands
the exporters torch's batch_norm while they trace. The tests hold the exported model to what the
same model built from torch's layers exports: the ONNX Runtime outputs, the graph's operators, and
the buffers the export leaves behind (the TorchScript exporter runs a training forward for real).
"""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import bn_ext

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
HAS_ONNXSCRIPT = True
try:
    import onnxscript  # noqa: F401  (the default exporter's translator)
except ImportError:
    HAS_ONNXSCRIPT = False

EXPORTERS = [
    pytest.param("dynamo", marks=pytest.mark.skipif(not HAS_ONNXSCRIPT,
                                                    reason="needs onnxscript")),
    "torchscript",
]


def export(model, x, exporter, training, dynamic_batch=False):
    """The ONNX model's bytes."""
    with warnings.catch_warnings():
        # the TorchScript exporter's deprecation warning, and torch's own export warnings
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dynamic = ({"input": {0: torch.export.Dim("batch", min=2, max=64)}}
                       if dynamic_batch else None)
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                        input_names=["x"], dynamic_shapes=dynamic)
            return program.model_proto.SerializeToString()
        f = io.BytesIO()
        mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
        torch.onnx.export(model, (x,), f, dynamo=False, training=mode, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}} if dynamic_batch else None)
        return f.getvalue()


def run_onnx(data, x):
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def op_types(data):
    return sorted({node.op_type for node in onnx.load_from_string(data).graph.node})


class Functional(nn.Module):
    """bn_ext.batch_norm (the functional API) over buffers of its own."""

    def __init__(self, C):
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1, 1, C))
        self.register_buffer("var", torch.linspace(0.5, 2, C))
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, C))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, C))

    def forward(self, x):
        return bn_ext.batch_norm(x, self.mean, self.var, self.weight, self.bias,
                                 training=self.training, momentum=0.2, eps=1e-3)


class TorchFunctional(Functional):
    def forward(self, x):
        return torch.nn.functional.batch_norm(x, self.mean, self.var, self.weight, self.bias,
                                              training=self.training, momentum=0.2, eps=1e-3)


def with_stats(layer):
    """Running statistics away from their initial 0 and 1, so that eval tests use them."""
    if getattr(layer, "running_mean", None) is not None:
        g = torch.Generator().manual_seed(1)
        layer.running_mean.uniform_(-1, 1, generator=g)
        layer.running_var.uniform_(0.5, 2, generator=g)
    return layer


# (name, torch model built fresh, input): conv + BN + ReLU stacks and single layers
CASES = {
    "conv-bn2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), with_stats(nn.BatchNorm2d(8)),
                                        nn.ReLU()),
                  lambda: torch.randn(4, 3, 12, 12)),
    "bn2d-channels-last": (lambda: with_stats(nn.BatchNorm2d(6)),
                           lambda: torch.randn(4, 6, 5, 7).to(memory_format=torch.channels_last)),
    "bn1d-rows": (lambda: with_stats(nn.BatchNorm1d(16)), lambda: torch.randn(8, 16)),
    "bn1d-sequence": (lambda: with_stats(nn.BatchNorm1d(5, affine=False)),
                      lambda: torch.randn(4, 5, 9)),
    "bn3d-cumulative": (lambda: with_stats(nn.BatchNorm3d(4, momentum=None)),
                        lambda: torch.randn(2, 4, 3, 4, 5)),
    "bn2d-untracked": (lambda: nn.BatchNorm2d(3, track_running_stats=False),
                       lambda: torch.randn(4, 3, 6, 6)),
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_runs_as_torchs_export(case, training, exporter):
    if case == "bn3d-cumulative" and training and exporter == "dynamo":
        pytest.skip("torch's own layer does not export: momentum=None in training takes "
                    "float(num_batches_tracked), data-dependent under torch.export")
    make, make_input = CASES[case]
    torch.manual_seed(0)
    ref = make().train(training)
    ours = bn_ext.convert_model(copy.deepcopy(ref))
    assert any(type(m).__module__.startswith("bn_ext") for m in ours.modules())
    x = make_input()

    ref_data = export(ref, x, exporter, training)
    our_data = export(ours, x, exporter, training)

    assert op_types(our_data) == op_types(ref_data)
    expected = run_onnx(ref_data, x)
    torch.testing.assert_close(run_onnx(our_data, x), expected, atol=1e-5, rtol=1e-5)
    if not training:
        # and the runtime computes what the layer computes in eager mode (in training, torch's
        # exporters differ from eager themselves: torch.export's writes an inference
        # BatchNormalization, on the running statistics, for a layer in training mode)
        with torch.no_grad():
            eager = copy.deepcopy(ours)(x)
        torch.testing.assert_close(expected, eager.contiguous(), atol=1e-4, rtol=1e-4)
    # the buffers the export leaves: as torch's layers leave theirs, num_batches_tracked too
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert ref_state.keys() == our_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(our_state[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_functional_batch_norm_exports(exporter):
    torch.manual_seed(0)
    ref = TorchFunctional(6).eval()
    ours = Functional(6).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 4, 4)
    our_data = export(ours, x, exporter, training=False)
    assert "BatchNormalization" in op_types(our_data)
    assert op_types(our_data) == op_types(export(ref, x, exporter, training=False))
    torch.testing.assert_close(run_onnx(our_data, x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_batch(exporter):
    torch.manual_seed(0)
    model = bn_ext.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1),
                                               with_stats(nn.BatchNorm2d(4)))).eval()
    data = export(model, torch.randn(4, 3, 5, 5), exporter, training=False, dynamic_batch=True)
    for batch in (2, 7):
        x = torch.randn(batch, 3, 5, 5)
        with torch.no_grad():
            torch.testing.assert_close(run_onnx(data, x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_export_keeps_bn_ext_ops():
    """Outside ONNX export, torch.export records bn_ext's own ops (AOTInductor runs them)."""
    model = with_stats(bn_ext.BatchNorm2d(4)).eval()
    program = torch.export.export(model, (torch.randn(2, 4, 3, 3),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "bn_ext.normalize.default" in targets, targets


def test_eager_calls_do_not_ask_the_onnx_flag(monkeypatch):
    """torch.onnx.is_in_onnx_export costs ~3 us a call; a plain forward must not pay it."""
    def refuse():
        raise AssertionError("is_in_onnx_export asked outside any tracing")
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", refuse)
    layer = bn_ext.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    layer.eval()(x)
    with torch.no_grad():
        layer(x)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_sync_batchnorm_exports_in_eval(exporter):
    """In eval SyncBatchNorm is BatchNorm, and exports as torch's SyncBatchNorm does."""
    torch.manual_seed(0)
    ref = with_stats(nn.SyncBatchNorm(5)).eval()
    ours = bn_ext.SyncBatchNorm(5).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 4, 4)
    ref_data, our_data = export(ref, x, exporter, False), export(ours, x, exporter, False)
    assert op_types(our_data) == op_types(ref_data)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(our_data, x), ours(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_onnx(our_data, x), run_onnx(ref_data, x), atol=1e-5,
                               rtol=1e-5)
