#include "generator/generator.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>

#include "backend/backend.h"
#include "errors.h"
#include "tokenizer/tokenizer.h"

namespace babyrt {

void validate(const GenerateOptions& o) {
  if (o.max_new_tokens < 1 || o.max_new_tokens > kMaxNewTokensLimit)
    throw ArgumentError("max_new_tokens must be in [1, " + std::to_string(kMaxNewTokensLimit) +
                        "], got " + std::to_string(o.max_new_tokens));
  validate(o.sampling);
  for (const auto& s : o.stop)
    if (s.empty()) throw ArgumentError("stop strings must not be empty");
}

struct Generation::Impl {
  using Clock = std::chrono::steady_clock;

  const Backend& backend;
  const Tokenizer& tokenizer;
  const Metadata& meta;
  GenerateOptions options;
  Sampler sampler;
  KVCache cache;
  std::vector<int32_t> tokens;
  int64_t cached = 0;  // tokens whose K/V sit in the cache, at positions [0, cached)
  bool prefilled = false;
  bool finished = false;
  Utf8Stream utf8;
  std::string held;  // decoded text not yet handed out: it may start a stop string
  std::string tail;  // text left to hand out after finishing
  GenerationStats stats;

  Impl(const Backend& b, const Tokenizer& t, std::string_view prompt, const GenerateOptions& o)
      : backend(b), tokenizer(t), meta(b.metadata()), options(o), sampler(o.sampling) {
    validate(o);
    tokens = tokenizer.encode(prompt, meta.add_bos);
    if (tokens.empty())
      throw ArgumentError("the prompt is empty and this model has no BOS token to start from");
    if (meta.cache_kind == "kv" && static_cast<int64_t>(tokens.size()) > meta.context_length)
      throw ArgumentError("the prompt is " + std::to_string(tokens.size()) +
                          " tokens; the model's context holds " +
                          std::to_string(meta.context_length));
    stats.prompt_tokens = static_cast<int64_t>(tokens.size());
    cache = backend.new_cache(1);
  }

  // Runs tokens[begin, end) at positions pos0.. and returns the logits of the last one.
  at::Tensor forward(size_t begin, size_t end, int64_t pos0) {
    const auto n = static_cast<int64_t>(end - begin);
    at::Tensor ids = at::from_blob(tokens.data() + begin, {1, n}, at::kInt)
                         .to(backend.device(), at::kLong);
    at::Tensor pos =
        at::arange(pos0, pos0 + n, at::TensorOptions().dtype(at::kLong).device(backend.device()))
            .unsqueeze(0);
    return backend.forward(ids, pos, cache).select(1, n - 1).select(0, 0);
  }

  // Feeds what the model has not seen yet and samples the next token.
  int32_t advance() {
    const auto t0 = Clock::now();
    const size_t n = tokens.size();
    const int64_t ctx = meta.context_length;
    at::Tensor logits;
    if (meta.cache_kind == "window") {
      // Stateless: the last context_length tokens, every step.
      logits = forward(n - std::min<size_t>(n, ctx), n, 0);
    } else if (!prefilled) {
      logits = forward(0, n, 0);
      cached = static_cast<int64_t>(n);
    } else if (cached == ctx) {
      // The context is full: slide by re-prefilling the last context_length tokens at
      // positions from 0, so every token sees exactly the ctx tokens before it (as nanoGPT's
      // cropping does), whatever the position encoding.
      logits = forward(n - ctx, n, 0);
    } else {
      logits = forward(n - 1, n, cached);
      ++cached;
    }
    at::Tensor row = logits.to(at::kCPU).contiguous();
    const int32_t next = sampler.sample(row.data_ptr<float>(), row.numel());
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (prefilled) {
      stats.decode_seconds += dt;
      ++stats.decode_steps;
    } else {
      stats.prefill_seconds += dt;
      prefilled = true;
    }
    return next;
  }

  void finish(const char* reason) {
    finished = true;
    stats.finish_reason = reason;
    tail = held + utf8.finish();
    held.clear();
  }

  // Adds decoded text, handing out all of it except what could begin a stop string.
  void emit(const std::string& text, std::string& out) {
    held += text;
    size_t first = std::string::npos;
    for (const auto& s : options.stop) first = std::min(first, held.find(s));
    if (first != std::string::npos) {
      out += held.substr(0, first);
      held.clear();
      finished = true;
      stats.finish_reason = "stop";
      return;
    }
    size_t keep = 0;
    for (const auto& s : options.stop)
      for (size_t k = std::min(s.size() - 1, held.size()); k > keep; --k)
        if (held.compare(held.size() - k, k, s, 0, k) == 0) {
          keep = k;
          break;
        }
    out += held.substr(0, held.size() - keep);
    held.erase(0, held.size() - keep);
  }

  void step(std::string& out) {
    const int32_t next = advance();
    if (next == meta.eos_id) return finish("eos");
    const int32_t prev = tokens.back();
    tokens.push_back(next);
    ++stats.generated_tokens;
    emit(utf8.push(tokenizer.piece_bytes(prev, next)), out);
    if (!finished && stats.generated_tokens >= options.max_new_tokens) finish("length");
  }
};

Generation::Generation(const Backend& backend, const Tokenizer& tokenizer,
                       std::string_view prompt, const GenerateOptions& options)
    : impl_(std::make_unique<Impl>(backend, tokenizer, prompt, options)) {}

Generation::~Generation() = default;

bool Generation::next(std::string& piece) {
  piece.clear();
  while (piece.empty()) {
    if (impl_->finished) {
      piece.swap(impl_->tail);
      return !piece.empty();
    }
    impl_->step(piece);
  }
  return true;
}

std::string Generation::run() {
  std::string text, piece;
  while (next(piece)) text += piece;
  return text;
}

const GenerationStats& Generation::stats() const { return impl_->stats; }
const std::vector<int32_t>& Generation::tokens() const { return impl_->tokens; }

}  // namespace babyrt
