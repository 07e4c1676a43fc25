// The TorchScript backend: runs model.pt through torch::jit.
#include <torch/cuda.h>
#include <torch/script.h>
#include <unistd.h>

#include "backend/backend.h"
#include "errors.h"

namespace babyrt {
namespace {

// c10::Error carries a C++ backtrace after its first line; users need the first line.
std::string first_line(const std::exception& e) {
  std::string w = e.what();
  return w.substr(0, w.find('\n'));
}

c10::Device parse_device(const std::string& name) {
  c10::Device device(c10::kCPU);
  try {
    device = c10::Device(name);
  } catch (const std::exception&) {
    throw ArgumentError("device must be 'cpu', 'cuda' or 'cuda:N', got '" + name + "'");
  }
  if (device.is_cuda()) {
    if (!torch::cuda::is_available())
      throw DeviceError("device '" + name + "' asked for, but no CUDA GPU is available" +
#ifdef BABYRT_WITH_CUDA
                        std::string("")
#else
                        std::string(" (this babyrt was built without CUDA)")
#endif
      );
    if (device.has_index() && device.index() >= static_cast<int>(torch::cuda::device_count()))
      throw DeviceError("device '" + name + "' does not exist (" +
                        std::to_string(torch::cuda::device_count()) + " GPUs)");
  } else if (!device.is_cpu()) {
    throw ArgumentError("device must be 'cpu', 'cuda' or 'cuda:N', got '" + name + "'");
  }
  return device;
}

// Without c10::str: its ostream is not safe in this library on every build (ops.cpp says why).
std::string shape_str(c10::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "fp32";
    case c10::kBFloat16: return "bf16";
    case c10::kHalf: return "fp16";
    default: return c10::toString(t);
  }
}

class TorchScriptBackend final : public Backend {
 public:
  TorchScriptBackend(const ArtifactPaths& paths, const Metadata& meta, const BackendOptions& opt)
      : meta_(meta), device_(parse_device(opt.device)) {
    dtype_ = parse_dtype(opt.dtype.empty() ? meta.dtype : opt.dtype);
    try {
      module_ = torch::jit::load(paths.model, device_);
    } catch (const std::exception& e) {
      throw ArtifactError(paths.model + ": cannot load the TorchScript module: " + first_line(e));
    }
    module_.eval();
    // Only float parameters change dtype: int8 weights, their scales and buffers such as RoPE
    // tables (python/babyrt/quantize.py) keep theirs.
    if (dtype_ != parse_dtype(meta.dtype))
      for (const auto& p : module_.named_parameters(/*recurse=*/true))
        if (p.value.is_floating_point()) p.value.set_data(p.value.to(dtype_));
  }

  const Metadata& metadata() const override { return meta_; }
  c10::Device device() const override { return device_; }
  std::string dtype() const override { return dtype_name(dtype_); }

  KVCache new_cache(int64_t batch) const override {
    auto opts = at::TensorOptions().dtype(dtype_).device(device_);
    if (meta_.cache_kind != "kv") return {at::empty({0}, opts), at::empty({0}, opts)};
    const std::vector<int64_t> shape{meta_.n_layers, batch, meta_.n_kv_heads,
                                     meta_.context_length, meta_.head_dim};
    const double bytes = 2.0 * c10::multiply_integers(shape) * c10::elementSize(dtype_);
    if (device_.is_cpu()) {
      // Refuse what cannot fit before touching it: zero-filling an overcommitted allocation
      // would bring in the OOM killer instead of an error.
      const double ram = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
      if (bytes > ram)
        throw DeviceError("the KV cache needs " + std::to_string(bytes / 1e9) +
                          " GB, more than this machine's " + std::to_string(ram / 1e9) + " GB");
    }
    try {
      return {at::zeros(shape, opts), at::zeros(shape, opts)};
    } catch (const std::exception& e) {
      throw DeviceError("cannot allocate the KV cache (" + std::to_string(bytes / 1e9) +
                        " GB) on " + device_.str() + ": " + first_line(e));
    }
  }

  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& positions,
                     KVCache& cache) const override {
    c10::InferenceMode guard;
    at::Tensor logits;
    try {
      logits = module_.forward({tokens, positions, cache.k, cache.v}).toTensor();
    } catch (const c10::OutOfMemoryError& e) {
      throw DeviceError("out of memory in forward: " + first_line(e));
    } catch (const std::exception& e) {
      throw Error("model forward failed: " + first_line(e));
    }
    if (logits.dim() != 3 || logits.size(0) != tokens.size(0) ||
        logits.size(1) != tokens.size(1) || logits.size(2) != meta_.vocab_size)
      throw ArtifactError("model returned logits of shape " + shape_str(logits.sizes()) +
                          ", expected [" + std::to_string(tokens.size(0)) + ", " +
                          std::to_string(tokens.size(1)) + ", " +
                          std::to_string(meta_.vocab_size) + "]");
    return logits.to(at::kFloat);
  }

 private:
  Metadata meta_;
  c10::Device device_;
  c10::ScalarType dtype_ = c10::kFloat;
  // forward() is not const in torch::jit, but leaves the weights alone; the graph executor
  // is safe to call from several threads at once.
  mutable torch::jit::Module module_;
};

}  // namespace

c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "fp32") return c10::kFloat;
  if (name == "bf16") return c10::kBFloat16;
  if (name == "fp16") return c10::kHalf;
  throw ArgumentError("dtype must be fp32, bf16 or fp16, got '" + name + "'");
}

std::unique_ptr<Backend> load_backend(const ArtifactPaths& paths, const Metadata& metadata,
                                      const BackendOptions& options) {
  return std::make_unique<TorchScriptBackend>(paths, metadata, options);
}

}  // namespace babyrt
