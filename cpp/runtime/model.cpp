#include "runtime/model.h"

#include <ATen/ATen.h>

#include "backend/backend.h"
#include "generator/device_loop.h"
#include "tokenizer/tokenizer.h"

namespace babyrt {

std::shared_ptr<Model> Model::load(const std::string& artifact_dir, const LoadOptions& options) {
  const ArtifactPaths paths = locate_artifact(artifact_dir);
  std::shared_ptr<Model> m(new Model());
  m->metadata_ = read_metadata(paths.model);
  const Metadata& meta = m->metadata_;
  TokenizerOptions topt;
  topt.vocab_size = meta.vocab_size;
  topt.bos_id = meta.bos_id;
  topt.eos_id = meta.eos_id;
  topt.sentencepiece = meta.tokenizer_kind == "sentencepiece";
  m->tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_file(paths.tokenizer, topt));
  m->backend_ = load_backend(paths, meta, {options.device, options.dtype});
  m->loops_ = std::make_unique<DeviceLoopPool>(*m->backend_);
  return m;
}

Model::~Model() = default;

std::string Model::device() const { return backend_->device().str(); }
std::string Model::dtype() const { return backend_->dtype(); }

std::vector<int32_t> Model::encode(std::string_view text, bool add_bos) const {
  return tokenizer_->encode(text, add_bos);
}

std::string Model::decode(const std::vector<int32_t>& ids) const { return tokenizer_->decode(ids); }

std::unique_ptr<Generation> Model::start(std::string_view prompt,
                                         const GenerateOptions& options) const {
  return std::make_unique<Generation>(*backend_, *tokenizer_, prompt, options, loops_.get());
}

BatchResult Model::generate_batch(const std::vector<std::string>& prompts,
                                  const GenerateOptions& options) const {
  return babyrt::generate_batch(*backend_, *tokenizer_, *loops_, prompts, options);
}

std::string Model::generate(std::string_view prompt, const GenerateOptions& options,
                            GenerationStats* stats,
                            const std::function<void(std::string_view)>& on_piece) const {
  Generation g(*backend_, *tokenizer_, prompt, options, loops_.get());
  std::string text, piece;
  while (g.next(piece)) {
    if (on_piece) on_piece(piece);
    text += piece;
  }
  if (stats) *stats = g.stats();
  return text;
}

Logits Model::logits(const std::vector<int32_t>& ids, int64_t prefill) const {
  const auto n = static_cast<int64_t>(ids.size());
  if (n == 0) throw ArgumentError("logits needs at least one token id");
  for (int32_t id : ids)
    if (id < 0 || id >= metadata_.vocab_size)
      throw ArgumentError("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                          std::to_string(metadata_.vocab_size) + ")");
  if (prefill <= 0 || prefill > n) prefill = n;
  const bool windowed = metadata_.cache_kind == "window";
  if (!windowed && n > metadata_.context_length)
    throw ArgumentError(std::to_string(n) + " ids; the model's context holds " +
                        std::to_string(metadata_.context_length));
  const auto dev = at::TensorOptions().dtype(at::kLong).device(backend_->device());
  const at::Tensor all = at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), dev).unsqueeze(0);
  KVCache cache = backend_->new_cache(1);
  std::vector<at::Tensor> parts;
  auto forward = [&](int64_t begin, int64_t end, int64_t pos0) {
    at::Tensor pos = at::arange(pos0, pos0 + (end - begin), dev).unsqueeze(0);
    return backend_->forward(all.slice(1, begin, end), pos, cache)[0];
  };
  if (windowed) {
    // A window model sees the last context_length ids up to each position.
    for (int64_t i = 0; i < n; ++i) {
      const int64_t from = std::max<int64_t>(0, i + 1 - metadata_.context_length);
      parts.push_back(forward(from, i + 1, 0).slice(0, i - from));
    }
  } else {
    parts.push_back(forward(0, prefill, 0));
    for (int64_t i = prefill; i < n; ++i) parts.push_back(forward(i, i + 1, i));
  }
  at::Tensor t = at::cat(parts, 0).to(at::kCPU).contiguous();
  Logits l;
  l.rows = t.size(0);
  l.cols = t.size(1);
  l.data.assign(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
  return l;
}

const char* version() {
#ifdef BABYRT_VERSION
  return BABYRT_VERSION;
#else
  return "unknown";
#endif
}

}  // namespace babyrt
