// The execution backend: the only part of the runtime that knows how a model file runs.
// The generator talks to this interface; TorchScript is one implementation, and an
// AOTInductor (.pt2) backend can be added beside it without touching the generator.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "artifact/artifact.h"

namespace babyrt {

// One generation's KV cache, owned by the runtime and passed to every forward call.
// k and v: [n_layers, batch, n_kv_heads, context_length, head_dim] in the model's dtype.
// Window (stateless) models get empty tensors.
struct KVCache {
  at::Tensor k, v;
};

struct BackendOptions {
  std::string device = "cpu";  // cpu | cuda | cuda:N
  std::string dtype;           // fp32 | bf16 | fp16; empty: as stored
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const Metadata& metadata() const = 0;
  virtual c10::Device device() const = 0;
  virtual std::string dtype() const = 0;
  virtual KVCache new_cache(int64_t batch) const = 0;
  // tokens, positions: int64 [B, T] on device(). Positions index the cache; each query
  // attends to cached positions <= its own. Returns fp32 logits [B, T, vocab] on device().
  virtual at::Tensor forward(const at::Tensor& tokens, const at::Tensor& positions,
                             KVCache& cache) const = 0;
};

// Opens the model file of an artifact with the backend that reads it.
// Throws ArtifactError for an unreadable model, DeviceError for an absent device.
std::unique_ptr<Backend> load_backend(const ArtifactPaths& paths, const Metadata& metadata,
                                      const BackendOptions& options);

// Maps "fp32" | "bf16" | "fp16" to a scalar type; throws ArgumentError otherwise.
c10::ScalarType parse_dtype(const std::string& name);

}  // namespace babyrt
