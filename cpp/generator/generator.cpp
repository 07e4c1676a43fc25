#include "generator/generator.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <deque>

#include "backend/backend.h"
#include "errors.h"
#include "generator/device_loop.h"
#include "tokenizer/tokenizer.h"

namespace babyrt {

void validate(const GenerateOptions& o) {
  if (o.max_new_tokens < 1 || o.max_new_tokens > kMaxNewTokensLimit)
    throw ArgumentError("max_new_tokens must be in [1, " + std::to_string(kMaxNewTokensLimit) +
                        "], got " + std::to_string(o.max_new_tokens));
  validate(o.sampling);
  for (const auto& s : o.stop)
    if (s.empty()) throw ArgumentError("stop strings must not be empty");
  if (o.sync_every < 1 || o.sync_every > 4096)
    throw ArgumentError("sync_every must be in [1, 4096], got " + std::to_string(o.sync_every));
}

namespace {

// Token ids in, text out: reassembles UTF-8 across tokens, and holds back text that may begin
// a stop string until it is known not to.
class TextStream {
 public:
  TextStream(const Tokenizer& tokenizer, const std::vector<std::string>& stop)
      : tokenizer_(tokenizer), stop_(stop) {}

  // Appends the text of `next` (after `prev`) to out; true when a stop string ended it.
  bool push(int32_t prev, int32_t next, std::string& out) {
    held_ += utf8_.push(tokenizer_.piece_bytes(prev, next));
    size_t first = std::string::npos;
    for (const auto& s : stop_) first = std::min(first, held_.find(s));
    if (first != std::string::npos) {
      out += held_.substr(0, first);
      held_.clear();
      return true;
    }
    size_t keep = 0;
    for (const auto& s : stop_)
      for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; --k)
        if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
          keep = k;
          break;
        }
    out += held_.substr(0, held_.size() - keep);
    held_.erase(0, held_.size() - keep);
    return false;
  }

  // What is left at the end (not at a stop string): held text and unfinished UTF-8.
  std::string finish() {
    std::string rest = held_ + utf8_.finish();
    held_.clear();
    return rest;
  }

 private:
  const Tokenizer& tokenizer_;
  const std::vector<std::string>& stop_;
  Utf8Stream utf8_;
  std::string held_;
};

int64_t sync_steps(const GenerateOptions& o) { return std::max<int64_t>(1, o.sync_every); }

}  // namespace

struct Generation::Impl {
  using Clock = std::chrono::steady_clock;

  const Backend& backend;
  const Tokenizer& tokenizer;
  const Metadata& meta;
  GenerateOptions options;
  Sampler sampler;
  std::shared_ptr<DeviceLoop> loop;  // on-device decoding; null: the host samples
  KVCache own_cache;
  KVCache* cache = &own_cache;
  std::vector<int32_t> tokens;
  std::deque<int32_t> ready;  // tokens the device made that were not handed out yet
  int64_t produced = 0;       // tokens the device made (handed out or not)
  int64_t cached = 0;  // tokens whose K/V sit in the cache, at positions [0, cached)
  bool prefilled = false;
  bool finished = false;
  TextStream text;
  std::string tail;  // text left to hand out after finishing
  GenerationStats stats;

  Impl(const Backend& b, const Tokenizer& t, std::string_view prompt, const GenerateOptions& o,
       DeviceLoopPool* loops)
      : backend(b), tokenizer(t), meta(b.metadata()), options(o), sampler(o.sampling),
        text(t, options.stop) {
    validate(o);
    tokens = tokenizer.encode(prompt, meta.add_bos);
    if (tokens.empty())
      throw ArgumentError("the prompt is empty and this model has no BOS token to start from");
    if (meta.cache_kind == "kv" && static_cast<int64_t>(tokens.size()) > meta.context_length)
      throw ArgumentError("the prompt is " + std::to_string(tokens.size()) +
                          " tokens; the model's context holds " +
                          std::to_string(meta.context_length));
    stats.prompt_tokens = static_cast<int64_t>(tokens.size());
    if (loops && decodes_on_device(backend)) {
      loop = loops->acquire(1, options.sampling);
      cache = &loop->cache();
    } else {
      own_cache = backend.new_cache(1);
    }
  }

  // Runs tokens[begin, end) at positions pos0.. and returns the logits of the last one.
  at::Tensor forward(size_t begin, size_t end, int64_t pos0) {
    const auto n = static_cast<int64_t>(end - begin);
    at::Tensor ids = at::from_blob(tokens.data() + begin, {1, n}, at::kInt)
                         .to(backend.device(), at::kLong);
    at::Tensor pos =
        at::arange(pos0, pos0 + n, at::TensorOptions().dtype(at::kLong).device(backend.device()))
            .unsqueeze(0);
    return backend.forward(ids, pos, *cache).select(1, n - 1).select(0, 0);
  }

  // The host path: feeds what the model has not seen yet and samples the next token.
  int32_t advance_on_host() {
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
    return sampler.sample(row.data_ptr<float>(), row.numel());
  }

  // The device path: tokens come from the loop a run of steps at a time. Once the context is
  // full, generation slides on the host path.
  int32_t advance_on_device(int64_t& steps) {
    if (!prefilled) {
      loop->prefill(0, tokens);
      cached = static_cast<int64_t>(tokens.size());
      const auto made = loop->advance(0);  // named: a temporary's element would dangle
      ready.assign(made[0].begin(), made[0].end());
      produced = 1;
      steps = 0;
    } else if (ready.empty()) {
      steps = std::min({sync_steps(options), options.max_new_tokens - produced,
                        meta.context_length - loop->position(0)});
      if (steps <= 0) {  // the context is full (steps left would have ended the generation)
        cached = loop->position(0);
        steps = 1;
        return advance_on_host();
      }
      const auto made = loop->advance(steps);
      ready.assign(made[0].begin(), made[0].end());
      produced += steps;
      cached = loop->position(0);
    } else {
      steps = 0;
    }
    const int32_t next = ready.front();
    ready.pop_front();
    return next;
  }

  int32_t advance() {
    const auto t0 = Clock::now();
    int64_t steps = 1;
    const int32_t next = loop ? advance_on_device(steps) : advance_on_host();
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (prefilled) {
      stats.decode_seconds += dt;
      stats.decode_steps += steps;
    } else {
      stats.prefill_seconds += dt;
      prefilled = true;
    }
    return next;
  }

  void finish(const char* reason) {
    finished = true;
    stats.finish_reason = reason;
    tail = text.finish();
  }

  void step(std::string& out) {
    const int32_t next = advance();
    if (next == meta.eos_id) return finish("eos");
    const int32_t prev = tokens.back();
    tokens.push_back(next);
    ++stats.generated_tokens;
    if (text.push(prev, next, out)) {
      finished = true;
      stats.finish_reason = "stop";
      return;
    }
    if (stats.generated_tokens >= options.max_new_tokens) finish("length");
  }
};

Generation::Generation(const Backend& backend, const Tokenizer& tokenizer,
                       std::string_view prompt, const GenerateOptions& options,
                       DeviceLoopPool* loops)
    : impl_(std::make_unique<Impl>(backend, tokenizer, prompt, options, loops)) {}

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

BatchResult generate_batch(const Backend& backend, const Tokenizer& tokenizer, DeviceLoopPool& loops,
                           const std::vector<std::string>& prompts, const GenerateOptions& options) {
  using Clock = std::chrono::steady_clock;
  validate(options);
  if (prompts.empty()) throw ArgumentError("generate_batch needs at least one prompt");
  const Metadata& meta = backend.metadata();
  const auto B = static_cast<int64_t>(prompts.size());
  BatchResult r;
  r.texts.assign(B, "");
  r.stats.assign(B, {});
  if (meta.cache_kind != "kv") {  // a window model has no cache rows to batch over
    for (int64_t b = 0; b < B; ++b) {
      Generation g(backend, tokenizer, prompts[b], options);
      r.texts[b] = g.run();
      r.stats[b] = g.stats();
    }
    return r;
  }
  const int64_t ctx = meta.context_length;
  std::vector<std::vector<int32_t>> ids(B);
  for (int64_t b = 0; b < B; ++b) {
    ids[b] = tokenizer.encode(prompts[b], meta.add_bos);
    if (ids[b].empty())
      throw ArgumentError("prompt " + std::to_string(b) +
                          " is empty and this model has no BOS token to start from");
    if (static_cast<int64_t>(ids[b].size()) > ctx)
      throw ArgumentError("prompt " + std::to_string(b) + " is " + std::to_string(ids[b].size()) +
                          " tokens; the model's context holds " + std::to_string(ctx));
    r.stats[b].prompt_tokens = static_cast<int64_t>(ids[b].size());
  }
  std::shared_ptr<DeviceLoop> loop = loops.acquire(B, options.sampling);
  std::vector<TextStream> streams;
  for (int64_t b = 0; b < B; ++b) streams.emplace_back(tokenizer, options.stop);
  std::vector<bool> done(B, false);
  int64_t live = B, steps_run = 0;

  auto finish = [&](int64_t b, const char* reason, bool flush) {
    if (flush) r.texts[b] += streams[b].finish();
    r.stats[b].finish_reason = reason;
    done[b] = true;
    --live;
    loop->park(b);
  };
  auto take = [&](const std::vector<std::vector<int32_t>>& made) {
    for (int64_t b = 0; b < B; ++b)
      for (int32_t t : made[b]) {
        if (done[b]) break;
        if (t == meta.eos_id) {
          finish(b, "eos", true);
          break;
        }
        const int32_t prev = ids[b].back();
        ids[b].push_back(t);
        if (streams[b].push(prev, t, r.texts[b])) {
          ++r.stats[b].generated_tokens;
          finish(b, "stop", false);
        } else if (++r.stats[b].generated_tokens >= options.max_new_tokens) {
          finish(b, "length", true);
        }
      }
  };

  const auto t0 = Clock::now();
  for (int64_t b = 0; b < B; ++b) loop->prefill(b, ids[b]);
  take(loop->advance(0));
  const auto t1 = Clock::now();
  while (live > 0) {
    int64_t steps = sync_steps(options);
    for (int64_t b = 0; b < B; ++b)
      if (!done[b])
        steps = std::min({steps, options.max_new_tokens - r.stats[b].generated_tokens,
                          ctx - loop->position(b)});
    if (steps <= 0) {  // some sequence filled the context
      for (int64_t b = 0; b < B; ++b)
        if (!done[b] && loop->position(b) >= ctx) finish(b, "length", true);
      continue;
    }
    take(loop->advance(steps));
    steps_run += steps;
  }
  const auto t2 = Clock::now();
  for (auto& s : r.stats) {
    s.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
    s.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
    s.decode_steps = steps_run;
  }
  return r;
}

}  // namespace babyrt
