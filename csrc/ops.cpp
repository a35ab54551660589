// The one front door: op schemas, argument checks, layout choice and backend dispatch.
//
// Every op below checks all of its arguments before it allocates or writes anything, so a call
// that raises leaves every buffer as it was. It then views the input as (N, C, S) in one of the
// two kernel layouts (bn_ext.h), converts per-channel vectors to the math type, and calls the CPU
// or CUDA kernel. Kernel files trust what they are given. The fake kernels (bn_ext/_fake.py) run
// the same checks in Python, in the same order; a test holds the two to the same outcome.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "bn_ext.h"

// Importing bn_ext._C only needs to run the TORCH_LIBRARY registrations below; the module itself
// is empty (the extension-cpp pattern, which keeps us on the limited Python API). In C++,
// PyMODINIT_FUNC is already extern "C".
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

namespace bn_ext {
namespace {

using c10::optional;

#if defined(BN_EXT_CUDA_EMULATOR)
// tests/cuda_emulator's build: the CUDA kernels, compiled for the host, run every op on CPU
// tensors, so that the whole test suite checks them without a GPU.
#define BN_EXT_KERNEL(device, fn, ...) cuda::fn(__VA_ARGS__)
#elif defined(BN_EXT_WITH_CUDA)
#define BN_EXT_KERNEL(device, fn, ...) \
  ((device).is_cuda() ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
#define BN_EXT_KERNEL(device, fn, ...) cpu::fn(__VA_ARGS__)
#endif

// float64 input computes in float64; float32, bfloat16 and float16 in float32.
at::ScalarType math_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_input(const char* op, const Tensor& input, const char* name = "input") {
  TORCH_CHECK(input.dim() >= 2, "bn_ext.", op, ": expected ", name,
              " of shape (N, C, *) with at least 2 dimensions, got ", input.dim(), "D");
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_dtype(input.scalar_type()), "bn_ext.", op, ": ", name,
              " has dtype ", input.scalar_type(),
              "; supported are float64, float32, bfloat16 and float16");
  TORCH_CHECK(input.layout() == at::kStrided, "bn_ext.", op, ": ", name,
              " must be a strided (dense) tensor");
}

void check_same_device(const char* op, const Tensor& input, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "bn_ext.", op, ": ", name, " is on ", t.device(),
              " but input is on ", input.device(), "; all tensors must be on one device");
}

// A per-channel vector (weight, bias, running/batch statistics): C elements, on the input's
// device, of the input's dtype, or of float32 when the input is float16/bfloat16 (autocast; the
// math type, which statistics that our own ops returned also have). As torch: float16 input
// takes no bfloat16 parameter (nor the reverse), float32 input no float64 one.
void check_channel_count(const char* op, const Tensor& input, const optional<Tensor>& t,
                         const char* name) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t C = input.size(1);
  check_same_device(op, input, *t, name);
  TORCH_CHECK(t->numel() == C, "bn_ext.", op, ": ", name, " should contain ", C,
              " elements (one per channel of the input), got ", t->numel());
}

void check_channel_vector(const char* op, const Tensor& input, const Tensor& t,
                          const char* name) {
  check_channel_count(op, input, t, name);
  const auto dt = t.scalar_type();
  const auto in = input.scalar_type();
  TORCH_CHECK(dt == in || dt == math_type(in), "bn_ext.", op, ": ", name, " has dtype ", dt,
              " which cannot be used with ", in, " input; expected ", in,
              (in == at::kHalf || in == at::kBFloat16) ? " or float32" : "");
}

void check_optional_vector(const char* op, const Tensor& input, const optional<Tensor>& t,
                           const char* name) {
  if (t.has_value() && t->defined()) check_channel_vector(op, input, *t, name);
}

void check_grad_out(const char* op, const Tensor& input, const Tensor& grad_out) {
  check_same_device(op, input, grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bn_ext.", op, ": grad_out has shape ",
              grad_out.sizes(), " but input has shape ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "bn_ext.", op,
              ": grad_out has dtype ", grad_out.scalar_type(), " but input has dtype ",
              input.scalar_type());
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK(eps >= 0, "bn_ext.", op, ": eps must be non-negative, got ", eps);
}

// The arguments every backward op shares.
void check_backward_args(const char* op, const Tensor& grad_out, const Tensor& input,
                         const Tensor& mean, const Tensor& var, const optional<Tensor>& weight,
                         double eps) {
  check_input(op, input);
  check_grad_out(op, input, grad_out);
  check_channel_vector(op, input, mean, "mean");
  check_channel_vector(op, input, var, "var");
  check_optional_vector(op, input, weight, "weight");
  check_eps(op, eps);
}

// ---- layout --------------------------------------------------------------------------------

// Channels-last in the general sense: dense with C innermost and the other dims in order. This is
// memory_format=channels_last(_3d) for 4-D/5-D, a (N, L, C) tensor transposed to (N, C, L) for
// 3-D, and any contiguous (N, C) tensor.
// Read off the strides, as t.movedim(1, -1).is_contiguous() would, without making the view (each
// view costs ~1 us, and a small op asked this up to five times).
bool is_channels_last_like(const Tensor& t) {
  if (t.numel() == 0) return true;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  int64_t expected = 1;
  const auto dense_at = [&](int64_t d) {  // innermost first, like is_contiguous
    if (sizes[d] == 1) return true;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
    return true;
  };
  if (!dense_at(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (!dense_at(d)) return false;
  }
  return dense_at(0);
}

int64_t spatial_size(const Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

// The layout for a tensor in neither layout, after a copy: contiguous, which is channels-last
// when S == 1 ((N, C) rows; the kernels' channels-last paths read whole rows).
Layout copy_layout(const Tensor& t) {
  return spatial_size(t) > 1 ? Layout::kContiguous : Layout::kChannelsLast;
}

// The layout a kernel can run on this tensor in place, if any.
optional<Layout> layout_of(const Tensor& t) {
  const int64_t S = spatial_size(t);
  if (t.is_contiguous() && S > 1) return Layout::kContiguous;
  if (is_channels_last_like(t)) return Layout::kChannelsLast;
  if (t.is_contiguous()) return Layout::kContiguous;
  return c10::nullopt;
}

// The same values in the given layout (no copy when already there).
Tensor to_layout(const Tensor& t, Layout layout) {
  if (layout == Layout::kContiguous) return t.contiguous();
  if (is_channels_last_like(t)) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

Geometry geometry(const Tensor& t, Layout layout) {
  return Geometry{t.size(0), t.size(1), spatial_size(t), layout};
}

// The layout a reduction reads the input in: its own, or contiguous after a copy.
Layout read_layout(const Tensor& input) {
  return layout_of(input).value_or(copy_layout(input));
}

// An output shaped like `input`, with the strides at::empty_like gives it (so that the fake
// kernels, which call torch.empty_like, agree): the input's own when they are dense and
// non-overlapping, else dense ones in the same order. When that is an odd dense permutation,
// the kernel writes a contiguous temporary that finish_output copies over.
struct Output {
  Tensor result;   // what the op returns
  Tensor target;   // what the kernel writes
  Layout layout;
};

Tensor empty_output_like(const Tensor& input, c10::MemoryFormat format) {
  if (!input.is_cpu()) return at::empty_like(input, format);
  if (format == c10::MemoryFormat::Preserve) {
    // at::empty_like's rule: a dense input's own strides, else dense strides in the input's
    // order of strides (a sliced channels_last input gives channels_last)
    return cpu::empty_output(input.sizes(),
                             input.is_non_overlapping_and_dense()
                                 ? input.strides().vec()
                                 : at::infer_dense_strides(input.sizes(), input.strides()),
                             input.scalar_type());
  }
  std::vector<int64_t> strides(input.dim(), 1);
  if (format == c10::MemoryFormat::ChannelsLast) {
    strides = c10::get_channels_last_strides_2d(input.sizes());
  } else if (format == c10::MemoryFormat::ChannelsLast3d) {
    strides = c10::get_channels_last_strides_3d(input.sizes());
  } else {
    for (int64_t d = input.dim() - 2; d >= 0; --d) {
      strides[d] = strides[d + 1] * std::max<int64_t>(input.size(d + 1), 1);
    }
  }
  return cpu::empty_output(input.sizes(), strides, input.scalar_type());
}

Output make_output(const Tensor& input) {
  Tensor out = empty_output_like(input, c10::MemoryFormat::Preserve);
  if (auto layout = layout_of(out)) return {out, out, *layout};
  return {out, empty_output_like(input, c10::MemoryFormat::Contiguous), copy_layout(input)};
}

void finish_output(Output& o) {
  if (!o.result.is_same(o.target)) o.result.copy_(o.target);
}

// A per-channel vector as the kernels want it: contiguous [C] in the math type. Most already
// are (a layer's parameters and buffers), and are passed as they are: the reshape, to and
// contiguous that would return them cost three dispatches each, ~1 us a small call. A
// contiguous math-type t comes back as a view of itself, so a kernel's writes reach it; any
// other is a converted copy (write_back returns an update to it).
Tensor as_math_vector(const Tensor& t, at::ScalarType math) {
  if (t.dim() == 1 && t.scalar_type() == math && t.is_contiguous()) return t;
  return t.reshape({-1}).to(math).contiguous();
}

Tensor as_math_vector(const optional<Tensor>& t, at::ScalarType math) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return as_math_vector(*t, math);
}

at::ScalarType param_type(const Tensor& input, const optional<Tensor>& weight) {
  if (weight.has_value() && weight->defined()) return weight->scalar_type();
  return math_type(input.scalar_type());
}

// A per-channel output in the math type (or `dtype`): uninitialized, for the kernel writes every
// channel of it (bn_ext.h), but zeros for an empty batch, which runs no kernel. On CUDA zeros
// would cost a fill launch each, as long as a small layer's own kernels.
Tensor math_output(const Tensor& input, optional<at::ScalarType> dtype = std::nullopt) {
  const auto options = input.options().dtype(dtype.value_or(math_type(input.scalar_type())));
  return input.numel() > 0 ? at::empty({input.size(1)}, options)
                           : at::zeros({input.size(1)}, options);
}

// ---- ops -----------------------------------------------------------------------------------

// dtype: the math type (None) or float64. The kernels form mean = k + sum(x - k) / n in double
// and round it once; float64 keeps the bits that rounding to float32 drops, an error of up to
// 6e-8 * |mean| where the sums' own is ~6e-8 * std (SyncBatchNorm adds the ranks' means).
std::tuple<Tensor, Tensor> batch_stats(const Tensor& input, optional<at::ScalarType> dtype) {
  check_input("batch_stats", input);
  TORCH_CHECK_VALUE(!dtype.has_value() || *dtype == at::kDouble ||
                        *dtype == math_type(input.scalar_type()),
                    "bn_ext.batch_stats: dtype must be None, float64 or the input's math type ",
                    math_type(input.scalar_type()), " (for ", input.scalar_type(), " input), got ",
                    *dtype);
  c10::DeviceGuard guard(input.device());
  Tensor mean = math_output(input, dtype);
  Tensor var = math_output(input, dtype);
  if (input.numel() == 0) return {mean, var};  // an empty batch has mean 0 and variance 0
  const Layout layout = read_layout(input);
  const Tensor x = to_layout(input, layout);
  BN_EXT_KERNEL(x, batch_stats, x, geometry(x, layout), mean, var);
  return {mean, var};
}

Tensor normalize(const Tensor& input, const Tensor& mean, const Tensor& var,
                 const optional<Tensor>& weight, const optional<Tensor>& bias, double eps) {
  const char* op = "normalize";
  check_input(op, input);
  check_channel_vector(op, input, mean, "mean");
  check_channel_vector(op, input, var, "var");
  check_optional_vector(op, input, weight, "weight");
  check_optional_vector(op, input, bias, "bias");
  check_eps(op, eps);
  c10::DeviceGuard guard(input.device());
  Output out = make_output(input);
  if (input.numel() == 0) return out.result;
  const auto math = math_type(input.scalar_type());
  const Tensor x = to_layout(input, out.layout);
  BN_EXT_KERNEL(x, normalize, x, geometry(x, out.layout), as_math_vector(mean, math),
                as_math_vector(var, math), as_math_vector(weight, math),
                as_math_vector(bias, math), eps, out.target);
  finish_output(out);
  return out.result;
}

// An update made through as_math_vector(buffer), back into buffer where that was a copy. Below
// ADInplaceOrView, so that the copy leaves the buffer's version counter alone as the kernels'
// direct writes do (train_forward's autograd kernel explains why); under inference_mode, where
// that kernel does not run, copy_ would bump it.
void write_back(const Tensor& updated, const Tensor& buffer) {
  if (updated.is_alias_of(buffer)) return;
  at::AutoDispatchBelowADInplaceOrView guard;
  buffer.copy_(updated.view_as(buffer));
}

// torch's modules count a batch with num_batches_tracked.add_(1), which bumps its version counter
// (and torch's kernel writes the running statistics without bumping theirs). Our kernels count it
// with a direct write, below autograd, so the op bumps it here, once a call, in every mode. An
// inference tensor has no counter to bump.
void bump_count_version(const optional<Tensor>& num_batches_tracked) {
  if (num_batches_tracked.has_value() && num_batches_tracked->defined() &&
      !num_batches_tracked->is_inference()) {
    num_batches_tracked->unsafeGetTensorImpl()->bump_version();
  }
}

// A buffer the op writes in place, checked before anything is written:
// - elements that share memory (an expand()ed tensor) would fail only in the write-back after
//   the kernel, with num_batches_tracked already counted;
// - an inference tensor (a layer built under torch.inference_mode()) may be updated only inside
//   inference mode: torch's in-place ops refuse it outside, and so the update must.
void check_updatable(const char* op, const Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "bn_ext.", op, ": ", name,
              " has elements that share memory (an expanded tensor?) and cannot be updated in "
              "place; pass a tensor of its own, e.g. ", name, ".clone()");
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), "bn_ext.", op, ": ", name,
              " is an inference tensor (made under torch.inference_mode()), and an inplace "
              "update to an inference tensor outside InferenceMode is not allowed; replace it "
              "with a clone made outside inference mode");
}

// The update's arguments besides the buffers: num_batches_tracked a one-element tensor of an
// integer or floating dtype on `like`'s device (a module's is int64, but torch counts in
// whatever a checkpoint loaded with assign=True brought), momentum a float (any, as torch:
// outside [0, 1] it extrapolates) or None (then num_batches_tracked is required).
void check_update_args(const char* op, const Tensor& like,
                       const optional<Tensor>& num_batches_tracked, optional<double> momentum) {
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (has_nbt) {
    check_same_device(op, like, *num_batches_tracked, "num_batches_tracked");
    const auto dt = num_batches_tracked->scalar_type();
    TORCH_CHECK(num_batches_tracked->numel() == 1 &&
                    (at::isFloatingType(dt) || dt == at::kByte || dt == at::kChar ||
                     dt == at::kShort || dt == at::kInt || dt == at::kLong),
                "bn_ext.", op, ": num_batches_tracked must be a tensor with one element of an "
                "integer or floating dtype (int64, as in torch's modules), got ",
                num_batches_tracked->numel(), " element(s) of ", dt);
    check_updatable(op, *num_batches_tracked, "num_batches_tracked");
  }
  TORCH_CHECK(momentum.has_value() || has_nbt, "bn_ext.", op,
              ": momentum=None (cumulative average) needs num_batches_tracked");
}

// The count as the kernels take it. They count in int64 (the CUDA kernels on the device, with
// no sync); a count of another dtype is counted here instead, as torch's add_(1) counts it (in
// its own dtype: an int32 wraps, a float16 stops at 2048), and the kernel is handed the
// cumulative average's factor 1 / count as its momentum. finish_count writes the count back.
struct Count {
  Tensor kernel_count;         // what the kernel counts in: the int64 count itself, or none
  optional<double> momentum;   // the kernel's momentum
  Tensor next;                 // another dtype's count + 1, for finish_count
};

Count prepare_count(const optional<Tensor>& num_batches_tracked, optional<double> momentum) {
  if (!num_batches_tracked.has_value() || !num_batches_tracked->defined()) {
    return {Tensor(), momentum, Tensor()};
  }
  if (num_batches_tracked->scalar_type() == at::kLong) {
    return {*num_batches_tracked, momentum, Tensor()};
  }
  at::AutoDispatchBelowADInplaceOrView below;
  Tensor next = num_batches_tracked->add(1);
  if (!momentum.has_value()) {
    // torch's module divides by the count too, and raises ZeroDivisionError where it is 0
    const double n = next.item<double>();
    TORCH_CHECK_VALUE(n != 0, "bn_ext: momentum=None averages over num_batches_tracked + 1 "
                      "batches, which is 0 here (", next.scalar_type(), " counts wrap around): "
                      "reset num_batches_tracked, or pass a float momentum");
    momentum = 1.0 / n;
  }
  return {Tensor(), momentum, next};
}

void finish_count(const Count& count, const optional<Tensor>& num_batches_tracked) {
  if (!count.next.defined()) return;
  at::AutoDispatchBelowADInplaceOrView below;  // the one bump is bump_count_version's
  num_batches_tracked->copy_(count.next);
}

// running_stats_update's arguments, checked against the batch statistics' channel count C and
// device (those of `like`): running_mean/running_var C floating elements of any floating dtype
// (the op is fed our own statistics), then the rest as check_update_args.
void check_running_stats(const char* op, const Tensor& like, int64_t C,
                         const Tensor& running_mean, const Tensor& running_var,
                         const optional<Tensor>& num_batches_tracked, optional<double> momentum) {
  const Tensor* named[] = {&running_mean, &running_var};
  const char* names[] = {"running_mean", "running_var"};
  for (int i = 0; i < 2; ++i) {
    check_same_device(op, like, *named[i], names[i]);
    TORCH_CHECK(named[i]->numel() == C, "bn_ext.", op, ": ", names[i], " should contain ", C,
                " elements, got ", named[i]->numel());
    TORCH_CHECK(is_supported_dtype(named[i]->scalar_type()), "bn_ext.", op, ": ", names[i],
                " must be floating point, got ", named[i]->scalar_type());
    check_updatable(op, *named[i], names[i]);
  }
  check_update_args(op, like, num_batches_tracked, momentum);
}

// The update itself, arguments checked: running <- (1 - m) running + m batch.
void apply_running_stats(Tensor& running_mean, Tensor& running_var,
                         const optional<Tensor>& num_batches_tracked, const Tensor& mean,
                         const Tensor& var, const Tensor& count, optional<double> momentum) {
  const auto math = math_type(mean.scalar_type());
  Tensor rm = as_math_vector(running_mean, math);
  Tensor rv = as_math_vector(running_var, math);
  const Count counted = prepare_count(num_batches_tracked, momentum);
  BN_EXT_KERNEL(mean, running_stats_update, rm, rv, counted.kernel_count,
                as_math_vector(mean, math), as_math_vector(var, math),
                count.reshape({}).to(math), counted.momentum);
  write_back(rm, running_mean);
  write_back(rv, running_var);
  finish_count(counted, num_batches_tracked);
}

void running_stats_update(Tensor& running_mean, Tensor& running_var,
                          const optional<Tensor>& num_batches_tracked, const Tensor& mean,
                          const Tensor& var, const Tensor& count, optional<double> momentum) {
  const char* op = "running_stats_update";
  TORCH_CHECK(mean.dim() == 1 && is_supported_dtype(mean.scalar_type()), "bn_ext.", op,
              ": mean must be a 1-D floating tensor");
  const int64_t C = mean.numel();
  check_same_device(op, mean, var, "var");
  TORCH_CHECK(var.numel() == C, "bn_ext.", op, ": var should contain ", C, " elements, got ",
              var.numel());
  TORCH_CHECK(is_supported_dtype(var.scalar_type()), "bn_ext.", op,
              ": var must be floating point, got ", var.scalar_type());
  check_same_device(op, mean, count, "count");
  TORCH_CHECK(count.numel() == 1 && at::isFloatingType(count.scalar_type()), "bn_ext.", op,
              ": count must be a floating tensor with one element");
  check_running_stats(op, mean, C, running_mean, running_var, num_batches_tracked, momentum);
  c10::DeviceGuard guard(mean.device());
  apply_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum);
  bump_count_version(num_batches_tracked);
}

// With running_mean given, also running_stats_update with the batch statistics (one op call
// instead of two: ~5 us of a small training forward); an empty batch only counts in
// num_batches_tracked, as in torch.
std::tuple<Tensor, Tensor, Tensor> train_forward(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum) {
  const char* op = "train_forward";
  check_input(op, input);
  // torch's order: the channel counts (RuntimeError), then the pairing of the running statistics
  // (ValueError), then the dtypes (RuntimeError)
  check_channel_count(op, input, weight, "weight");
  check_channel_count(op, input, bias, "bias");
  const bool update = running_mean.has_value() && running_mean->defined();
  TORCH_CHECK_VALUE(update == (running_var.has_value() && running_var->defined()), "bn_ext.", op,
                    ": running_mean and running_var must either both be None or neither be "
                    "None");
  check_optional_vector(op, input, weight, "weight");
  check_optional_vector(op, input, bias, "bias");
  check_eps(op, eps);
  if (update) {
    // A layer's buffers: weight's and bias's rule (as torch, and as eval's normalize), not
    // running_stats_update's looser one.
    check_channel_vector(op, input, *running_mean, "running_mean");
    check_channel_vector(op, input, *running_var, "running_var");
    check_updatable(op, *running_mean, "running_mean");
    check_updatable(op, *running_var, "running_var");
    check_update_args(op, input, num_batches_tracked, momentum);
  }
  c10::DeviceGuard guard(input.device());
  Output out = make_output(input);
  Tensor mean = math_output(input);
  Tensor var = math_output(input);
  if (input.numel() == 0) {
    if (update && num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      // counted as any batch: prepare_count refuses a count that wraps to 0 under momentum=None
      const Count counted = prepare_count(num_batches_tracked, momentum);
      if (counted.kernel_count.defined()) {
        at::AutoDispatchBelowADInplaceOrView below;  // the one bump is bump_count_version's
        num_batches_tracked->add_(1);
      }
      finish_count(counted, num_batches_tracked);
      bump_count_version(num_batches_tracked);
    }
    return {out.result, mean, var};
  }
  const auto math = math_type(input.scalar_type());
  const Tensor x = to_layout(input, out.layout);
  // The update runs in the kernel call, with the batch's count known here (no count tensor), on
  // math-type buffers: the module's own, or converted copies written back after.
  RunningStats running;
  Count counted;
  if (update) {
    counted = prepare_count(num_batches_tracked, momentum);
    running = RunningStats{as_math_vector(*running_mean, math), as_math_vector(*running_var, math),
                           counted.kernel_count, counted.momentum};
  }
  BN_EXT_KERNEL(x, train_forward, x, geometry(x, out.layout), as_math_vector(weight, math),
                as_math_vector(bias, math), eps, out.target, mean, var,
                update ? &running : nullptr);
  finish_output(out);
  if (update) {
    write_back(running.mean, *running_mean);
    write_back(running.var, *running_var);
    finish_count(counted, num_batches_tracked);
    bump_count_version(num_batches_tracked);
  }
  return {out.result, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_reduce(const Tensor& grad_out,
                                                           const Tensor& input,
                                                           const Tensor& mean, const Tensor& var,
                                                           const optional<Tensor>& weight,
                                                           double eps) {
  const char* op = "backward_reduce";
  check_backward_args(op, grad_out, input, mean, var, weight, eps);
  c10::DeviceGuard guard(input.device());
  const auto math = math_type(input.scalar_type());
  Tensor sum_dy = math_output(input), sum_dy_xmu = math_output(input);
  Tensor grad_weight = math_output(input), grad_bias = math_output(input);
  if (input.numel() > 0) {
    const Layout layout = read_layout(input);
    const Tensor x = to_layout(input, layout);
    const Tensor dy = to_layout(grad_out, layout);
    BN_EXT_KERNEL(x, backward_reduce, dy, x, geometry(x, layout), as_math_vector(mean, math),
                  as_math_vector(var, math), eps, sum_dy, sum_dy_xmu, grad_weight, grad_bias);
  }
  const auto pt = param_type(input, weight);
  return {sum_dy, sum_dy_xmu, grad_weight.to(pt), grad_bias.to(pt)};
}

Tensor backward_input(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                      const Tensor& var, const optional<Tensor>& weight,
                      const optional<Tensor>& sum_dy, const optional<Tensor>& sum_dy_xmu,
                      const optional<Tensor>& count, double eps) {
  const char* op = "backward_input";
  check_backward_args(op, grad_out, input, mean, var, weight, eps);
  check_optional_vector(op, input, sum_dy, "sum_dy");
  check_optional_vector(op, input, sum_dy_xmu, "sum_dy_xmu");
  const bool training = sum_dy.has_value() && sum_dy->defined();
  TORCH_CHECK(training == (sum_dy_xmu.has_value() && sum_dy_xmu->defined()) &&
                  training == (count.has_value() && count->defined()),
              "bn_ext.", op,
              ": sum_dy, sum_dy_xmu and count come together (training) or not at all (eval)");
  if (training) {
    check_same_device(op, input, *count, "count");
    TORCH_CHECK(count->numel() == 1 && at::isFloatingType(count->scalar_type()), "bn_ext.", op,
                ": count must be a floating tensor with one element");
  }
  c10::DeviceGuard guard(input.device());
  Output out = make_output(input);
  if (input.numel() == 0) return out.result;
  const auto math = math_type(input.scalar_type());
  // Eval reads no x (bn_ext.h): one that is in neither layout is not worth a copy.
  const Tensor x = training ? to_layout(input, out.layout) : input;
  const Tensor dy = to_layout(grad_out, out.layout);
  BN_EXT_KERNEL(x, backward_input, dy, x, geometry(x, out.layout), as_math_vector(mean, math),
                as_math_vector(var, math), as_math_vector(weight, math),
                as_math_vector(sum_dy, math), as_math_vector(sum_dy_xmu, math),
                training ? count->reshape({}).to(math) : Tensor(), eps, out.target);
  finish_output(out);
  return out.result;
}

// grad_input, grad_weight and grad_bias (these two in the parameters' dtype) in one call: of
// training (train_backward: backward_reduce, then backward_input with the sums) or of eval
// (normalize_backward: backward_input without the sums, and backward_reduce's two gradients).
std::tuple<Tensor, Tensor, Tensor> input_and_param_grads(const char* op, bool training,
                                                         const Tensor& grad_out,
                                                         const Tensor& input, const Tensor& mean,
                                                         const Tensor& var,
                                                         const optional<Tensor>& weight,
                                                         double eps) {
  check_backward_args(op, grad_out, input, mean, var, weight, eps);
  c10::DeviceGuard guard(input.device());
  const auto math = math_type(input.scalar_type());
  Output out = make_output(input);
  Tensor grad_weight = math_output(input), grad_bias = math_output(input);
  if (input.numel() > 0) {
    const Tensor x = to_layout(input, out.layout);
    const Tensor dy = to_layout(grad_out, out.layout);
    const Geometry g = geometry(x, out.layout);
    const Tensor m = as_math_vector(mean, math), v = as_math_vector(var, math);
    const Tensor w = as_math_vector(weight, math);
    if (training) {
      BN_EXT_KERNEL(x, train_backward, dy, x, g, m, v, w, eps, out.target, grad_weight,
                    grad_bias);
    } else {
      BN_EXT_KERNEL(x, normalize_backward, dy, x, g, m, v, w, eps, out.target, grad_weight,
                    grad_bias);
    }
    finish_output(out);
  }
  const auto pt = param_type(input, weight);
  return {out.result, grad_weight.to(pt), grad_bias.to(pt)};
}

std::tuple<Tensor, Tensor, Tensor> normalize_backward(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& mean, const Tensor& var,
                                                      const optional<Tensor>& weight,
                                                      double eps) {
  return input_and_param_grads("normalize_backward", false, grad_out, input, mean, var, weight,
                               eps);
}

std::tuple<Tensor, Tensor, Tensor> train_backward(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& var,
                                                  const optional<Tensor>& weight, double eps) {
  return input_and_param_grads("train_backward", true, grad_out, input, mean, var, weight, eps);
}

// ---- autograd for train_forward, in C++ -------------------------------------------------------
//
// The module's training forward and backward were an autograd.Function in Python: ~6 us a
// forward and a few a backward of interpreter and Function bookkeeping, a tenth of a 256x1000
// layer. This Autograd kernel does the same in C++. It redispatches below autograd, so fake,
// meta and compile tracing reach the same op. The backward runs train_backward (or
// backward_reduce when grad_input is not needed); with create_graph it runs the op
// _differentiable_train_backward, ATen ops that autograd can differentiate again (double
// backward).

// Whether an optional argument is given and requires grad.
bool grad_of(const optional<Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

// Whether an optional argument is given: only given tensors take an autograd edge.
bool given(const optional<Tensor>& t) {
  return t.has_value() && t->defined();
}

// Which of a Function's leading tensor arguments its backward must give a gradient, asked of the
// engine as the backward runs, not fixed at forward time: the graph task knows which edges it
// needs (autograd.grad(y, x) on an eval layer wants x's alone though the weight requires grad,
// and then backward_input alone runs, not normalize_backward). given[i]: whether argument i took
// an edge; edges are numbered over the given ones.
std::vector<bool> needed_now(const torch::autograd::AutogradContext* ctx,
                             const c10::List<bool>& given_args) {
  std::vector<bool> need(given_args.size(), false);
  size_t edge = 0;
  for (size_t i = 0; i < given_args.size(); ++i) {
    if (given_args.get(i)) need[i] = ctx->needs_input_grad(edge++);
  }
  return need;
}

class TrainForwardFunction : public torch::autograd::Function<TrainForwardFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
      const optional<Tensor>& bias, double eps, const optional<Tensor>& running_mean,
      const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked,
      optional<double> momentum) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bn_ext::train_forward", "")
                               .typed<decltype(train_forward)>();
    Tensor out, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, mean, var) = op.call(input, weight, bias, eps, running_mean, running_var,
                                         num_batches_tracked, momentum);
    }
    // The running statistics are written in place with their version counters left alone, as
    // torch's own batch_norm leaves them (and as this op did without an autograd kernel): an eval
    // graph that saved them backpropagates with their current values instead of raising.
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["given"] = std::vector<bool>{true, given(weight), given(bias)};
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    return {out, mean, var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor& grad_out = grads[0];
    torch::autograd::variable_list result(8);
    if (!grad_out.defined()) return result;
    const auto need = needed_now(ctx, ctx->saved_data["given"].toBoolList());
    const bool need_input = need[0];
    const optional<Tensor> w = weight.defined() ? optional<Tensor>(weight) : c10::nullopt;
    Tensor gi, gw, gb;
    if (at::GradMode::is_enabled()) {
      // A graph is being built (double backward): the backward in differentiable ATen ops,
      // written once, in Python (functional.py), for this and for BatchNormFunction.
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("bn_ext::_differentiable_train_backward", "")
              .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                        const optional<Tensor>&, double)>();
      std::tie(gi, gw, gb) = op.call(grad_out, input, w, eps);
    } else if (need_input) {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("bn_ext::train_backward", "")
                                 .typed<decltype(train_backward)>();
      std::tie(gi, gw, gb) = op.call(grad_out, input, mean, var, w, eps);
    } else {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("bn_ext::backward_reduce", "")
                                 .typed<decltype(backward_reduce)>();
      std::tie(std::ignore, std::ignore, gw, gb) = op.call(grad_out, input, mean, var, w, eps);
    }
    if (need_input) result[0] = gi;
    if (need[1]) result[1] = gw;
    if (need[2]) result[2] = gb;
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> train_forward_autograd(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum) {
  auto r = TrainForwardFunction::apply(input, weight, bias, eps, running_mean, running_var,
                                       num_batches_tracked, momentum);
  return {r[0], r[1], r[2]};
}

// ---- autograd for normalize, in C++ -----------------------------------------------------------
//
// Eval with grad (a frozen-statistics layer being fine-tuned) and any direct call of the op. As
// train_forward's: redispatch below autograd; the first-order backward runs the kernels
// (normalize_backward for x, weight and bias; backward_input for x alone, backward_reduce for
// the per-channel sums alone or with mean and var); with create_graph, the op
// _differentiable_normalize_backward. With s = w * invstd, invstd = (var + eps)^-1/2:
//   y = (x - mean) * s + b
//   dx = dy * s,  dw = sum(dy * (x - mean)) * invstd,  db = sum(dy)
//   dmean = -s * sum(dy),  dvar = -s * invstd^2 / 2 * sum(dy * (x - mean))
// (mean and var take a gradient only when called directly: batch_norm refuses running
// statistics that require grad, as torch does.)

// The op's kernel below autograd (fake, meta and compile tracing reach the same op).
Tensor normalize_below_autograd(const Tensor& input, const Tensor& mean, const Tensor& var,
                                const optional<Tensor>& weight, const optional<Tensor>& bias,
                                double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_ext::normalize", "")
                             .typed<decltype(normalize)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(input, mean, var, weight, bias, eps);
}

class NormalizeFunction : public torch::autograd::Function<NormalizeFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& input, const Tensor& mean,
                                                const Tensor& var, const optional<Tensor>& weight,
                                                const optional<Tensor>& bias, double eps) {
    const Tensor out = normalize_below_autograd(input, mean, var, weight, bias, eps);
    ctx->save_for_backward({input, mean, var, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["given"] = std::vector<bool>{true, true, true, given(weight), given(bias)};
    ctx->set_materialize_grads(false);
    return {out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &mean = saved[1], &var = saved[2], &weight = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor& grad_out = grads[0];
    torch::autograd::variable_list result(6);
    if (!grad_out.defined()) return result;
    const auto need = needed_now(ctx, ctx->saved_data["given"].toBoolList());
    const optional<Tensor> w = weight.defined() ? optional<Tensor>(weight) : c10::nullopt;
    Tensor gi, gm, gv, gw, gb;
    if (at::GradMode::is_enabled()) {
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("bn_ext::_differentiable_normalize_backward", "")
              .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                  const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                  const optional<Tensor>&, double)>();
      std::tie(gi, gm, gv, gw, gb) = op.call(grad_out, input, mean, var, w, eps);
    } else if (need[0] && (need[3] || need[4]) && !(need[1] || need[2])) {
      // A frozen-statistics layer being fine-tuned: all three in one op (one pass fewer).
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("bn_ext::normalize_backward", "")
                                 .typed<decltype(normalize_backward)>();
      std::tie(gi, gw, gb) = op.call(grad_out, input, mean, var, w, eps);
    } else {
      if (need[0]) {
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("bn_ext::backward_input", "")
                                   .typed<decltype(backward_input)>();
        gi = op.call(grad_out, input, mean, var, w, c10::nullopt, c10::nullopt, c10::nullopt,
                     eps);
      }
      if (need[1] || need[2] || need[3] || need[4]) {
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("bn_ext::backward_reduce", "")
                                   .typed<decltype(backward_reduce)>();
        Tensor sum_dy, sum_dy_xmu;
        std::tie(sum_dy, sum_dy_xmu, gw, gb) = op.call(grad_out, input, mean, var, w, eps);
        if (need[1] || need[2]) {
          // per-channel vectors of C, in the sums' (math) dtype
          const Tensor invstd = (var.to(sum_dy.scalar_type()) + eps).rsqrt();
          const Tensor s = w.has_value() ? invstd * w->to(sum_dy.scalar_type()) : invstd;
          if (need[1]) gm = (-s * sum_dy).to(mean.scalar_type());
          if (need[2]) gv = (s * invstd.square() * sum_dy_xmu * -0.5).to(var.scalar_type());
        }
      }
    }
    const Tensor* by_input[] = {&gi, &gm, &gv, &gw, &gb};
    for (int i = 0; i < 5; ++i) {
      if (need[i]) result[i] = *by_input[i];
    }
    return result;
  }
};

Tensor normalize_autograd(const Tensor& input, const Tensor& mean, const Tensor& var,
                          const optional<Tensor>& weight, const optional<Tensor>& bias,
                          double eps) {
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || mean.requires_grad() ||
                                       var.requires_grad() || grad_of(weight) || grad_of(bias))) {
    // No graph to record (eval under no_grad, the common case): straight to the kernel, without
    // the Function's bookkeeping (~3 us, a fifth of a small layer's call).
    return normalize_below_autograd(input, mean, var, weight, bias, eps);
  }
  return NormalizeFunction::apply(input, mean, var, weight, bias, eps)[0];
}

// ---- negative-bit views (torch._neg_view) ------------------------------------------------------
//
// torch's Negative fallback clones a negative-bit argument, runs the op on the clone and copies it
// back, assuming a mutable argument is also the op's first output. Ours return nothing
// (running_stats_update) or something else (train_forward): it then read past the stack
// (a segfault) or asserted after the buffers were written. These two ops get their own kernel at
// that key: refuse a negative-bit buffer before anything is written, resolve the read-only
// arguments, and go on below the key. The other ops, read-only, keep the fallback.

void check_buffers_not_neg(const char* op, const optional<Tensor>& running_mean,
                           const optional<Tensor>& running_var,
                           const optional<Tensor>& num_batches_tracked) {
  const optional<Tensor>* buffers[] = {&running_mean, &running_var, &num_batches_tracked};
  const char* names[] = {"running_mean", "running_var", "num_batches_tracked"};
  for (int i = 0; i < 3; ++i) {
    const optional<Tensor>& t = *buffers[i];
    TORCH_CHECK(!(t.has_value() && t->defined() && t->is_neg()), "bn_ext.", op, ": ", names[i],
                " is a negative-bit view (torch._neg_view) and cannot be updated in place; pass "
                "a tensor without the bit (", names[i], ".resolve_neg() makes one)");
  }
}

// The op's kernel below the Negative key.
template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

optional<Tensor> resolve_neg(const optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return t;
  return t->resolve_neg();
}

c10::DispatchKeySet below_negative(c10::DispatchKeySet ks) {
  return ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::Negative);
}

std::tuple<Tensor, Tensor, Tensor> train_forward_negative(
    c10::DispatchKeySet ks, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& bias, double eps, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked,
    optional<double> momentum) {
  check_buffers_not_neg("train_forward", running_mean, running_var, num_batches_tracked);
  static const auto op = op_handle<decltype(train_forward)>("bn_ext::train_forward");
  return op.redispatch(below_negative(ks), input.resolve_neg(), resolve_neg(weight),
                       resolve_neg(bias), eps, running_mean, running_var, num_batches_tracked,
                       momentum);
}

void running_stats_update_negative(c10::DispatchKeySet ks, Tensor& running_mean,
                                   Tensor& running_var,
                                   const optional<Tensor>& num_batches_tracked,
                                   const Tensor& mean, const Tensor& var, const Tensor& count,
                                   optional<double> momentum) {
  check_buffers_not_neg("running_stats_update", running_mean, running_var, num_batches_tracked);
  static const auto op = op_handle<decltype(running_stats_update)>("bn_ext::running_stats_update");
  op.redispatch(below_negative(ks), running_mean, running_var, num_batches_tracked,
                mean.resolve_neg(), var.resolve_neg(), count.resolve_neg(), momentum);
}

void empty_cpu_cache() { cpu::empty_output_cache(); }

std::vector<int64_t> cpu_cache_stats() { return cpu::output_cache_stats(); }

void _hold_cpu_cache_lock(double seconds) { cpu::hold_output_cache_lock(seconds); }

// Whether the CPU kernels' at::parallel_for runs on OpenMP's threads: setup.py leaves -fopenmp
// out where the compiler refuses it (Apple's clang), and the loops then run on one thread.
bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

#ifdef BN_EXT_WITH_CUDA
bool built_with_cuda() { return true; }
#else
bool built_with_cuda() { return false; }

// A CPU-only build on a CUDA torch (nvcc not found at install, or BN_EXT_FORCE_CPU=1) still gets
// CUDA tensors. Without a CUDA kernel the dispatcher's error lists backends; this one names the
// cause and the fix. Boxed, so one function serves every op.
void no_cuda_kernels(const c10::OperatorHandle& op, torch::jit::Stack*) {
  const std::string& name = op.schema().name();  // "bn_ext::op"
  TORCH_CHECK_NOT_IMPLEMENTED(
      false, "bn_ext.", name.substr(name.rfind(':') + 1), ": got CUDA tensors, but this ",
      "bn_ext was built without its CUDA kernels (at install time torch had no CUDA, nvcc was ",
      "not found, or BN_EXT_FORCE_CPU was set). Reinstall with a CUDA build of torch and the ",
      "CUDA toolkit (set CUDA_HOME if nvcc is not on the PATH): pip install ",
      "--no-build-isolation --force-reinstall --no-deps .");
}
#endif

}  // namespace

TORCH_LIBRARY(bn_ext, m) {
  m.def("batch_stats(Tensor input, *, ScalarType? dtype=None) -> (Tensor mean, Tensor var)");
  m.def("normalize(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
        "float eps) -> Tensor");
  m.def("train_forward(Tensor input, Tensor? weight, Tensor? bias, float eps, "
        "Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, "
        "Tensor(c!)? num_batches_tracked=None, float? momentum=None) "
        "-> (Tensor out, Tensor mean, Tensor var)");
  m.def("running_stats_update(Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, Tensor count, "
        "float? momentum) -> ()");
  m.def("backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
        "Tensor? weight, float eps) "
        "-> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight, Tensor grad_bias)");
  m.def("backward_input(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
        "Tensor? weight, Tensor? sum_dy, Tensor? sum_dy_xmu, Tensor? count, float eps) -> Tensor");
  m.def("normalize_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
        "Tensor? weight, float eps) -> (Tensor grad_input, Tensor grad_weight, "
        "Tensor grad_bias)");
  m.def("train_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
        "Tensor? weight, float eps) -> (Tensor grad_input, Tensor grad_weight, "
        "Tensor grad_bias)");
  // The training backward in differentiable ATen ops, for double backward: a
  // CompositeImplicitAutograd kernel in Python (functional.py).
  m.def("_differentiable_train_backward(Tensor grad_out, Tensor input, Tensor? weight, "
        "float eps) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // normalize's backward likewise (its autograd kernel, with create_graph).
  m.def("_differentiable_normalize_backward(Tensor grad_out, Tensor input, Tensor mean, "
        "Tensor var, Tensor? weight, float eps) -> (Tensor grad_input, Tensor grad_mean, "
        "Tensor grad_var, Tensor grad_weight, Tensor grad_bias)");
  // The CPU output cache (cpu/output_cache.cpp); no tensors in or out, so one kernel for all keys.
  m.def("empty_cpu_cache() -> ()", &empty_cpu_cache);
  m.def("cpu_cache_stats() -> int[]", &cpu_cache_stats);
  m.def("_hold_cpu_cache_lock(float seconds) -> ()", &_hold_cpu_cache_lock);  // tests only
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("built_with_openmp() -> bool", &built_with_openmp);
}

#define BN_EXT_REGISTER_IMPLS(m)                              \
  m.impl("batch_stats", &batch_stats);                        \
  m.impl("normalize", &normalize);                            \
  m.impl("train_forward", &train_forward);                    \
  m.impl("running_stats_update", &running_stats_update);      \
  m.impl("backward_reduce", &backward_reduce);                \
  m.impl("backward_input", &backward_input);                  \
  m.impl("normalize_backward", &normalize_backward);          \
  m.impl("train_backward", &train_backward);

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) { BN_EXT_REGISTER_IMPLS(m) }

TORCH_LIBRARY_IMPL(bn_ext, Autograd, m) {
  m.impl("normalize", &normalize_autograd);
  m.impl("train_forward", &train_forward_autograd);
}

TORCH_LIBRARY_IMPL(bn_ext, Negative, m) {
  m.impl("train_forward", &train_forward_negative);
  m.impl("running_stats_update", &running_stats_update_negative);
}

#ifdef BN_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) { BN_EXT_REGISTER_IMPLS(m) }
#else
TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) {
  for (const char* name : {"batch_stats", "normalize", "train_forward", "running_stats_update",
                           "backward_reduce", "backward_input", "normalize_backward",
                           "train_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernels>());
  }
}
#endif

}  // namespace bn_ext
