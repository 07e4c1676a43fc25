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

const GenerateOptions& validated(const GenerateOptions& o) {
  validate(o);
  return o;
}

// The prompt's ids; `name` ("the prompt", "prompt 3") starts the error messages.
std::vector<int32_t> encode_prompt(const Tokenizer& tokenizer, const Metadata& meta,
                                   std::string_view prompt, const std::string& name) {
  std::vector<int32_t> ids = tokenizer.encode(prompt, meta.add_bos);
  if (ids.empty())
    throw ArgumentError(name + " is empty and this model has no BOS token to start from");
  if (meta.cache_kind == "kv" && static_cast<int64_t>(ids.size()) > meta.context_length)
    throw ArgumentError(name + " is " + std::to_string(ids.size()) +
                        " tokens; the model's context holds " + std::to_string(meta.context_length));
  return ids;
}

// One sequence: its tokens, their text, and where it ends (EOS, a stop string, max_new_tokens).
struct Sequence {
  Sequence(const Tokenizer& tokenizer, const Metadata& meta, const GenerateOptions& options,
           std::vector<int32_t> prompt)
      : tokens(std::move(prompt)), text(tokenizer, options.stop), eos_id(meta.eos_id),
        max_new_tokens(options.max_new_tokens) {
    stats.prompt_tokens = static_cast<int64_t>(tokens.size());
  }

  // Takes the next generated token; its text, less what may begin a stop string, goes to out.
  void accept(int32_t next, std::string& out) {
    if (next == eos_id) return finish("eos");
    const int32_t prev = tokens.back();
    tokens.push_back(next);
    ++stats.generated_tokens;
    if (text.push(prev, next, out)) {
      finished = true;
      stats.finish_reason = "stop";
    } else if (stats.generated_tokens >= max_new_tokens) {
      finish("length");
    }
  }

  // Ends the sequence; what text is left goes to `tail`.
  void finish(const char* reason) {
    finished = true;
    stats.finish_reason = reason;
    tail = text.finish();
  }

  std::vector<int32_t> tokens;  // prompt and generated ids
  TextStream text;
  int32_t eos_id;
  int64_t max_new_tokens;
  bool finished = false;
  std::string tail;  // text left to hand out after finishing
  GenerationStats stats;
};

}  // namespace

struct Generation::Impl {
  using Clock = std::chrono::steady_clock;

  const Backend& backend;
  const Metadata& meta;
  GenerateOptions options;
  Sampler sampler;
  std::shared_ptr<DeviceLoop> loop;  // on-device decoding; null: the host samples
  KVCache own_cache;
  KVCache* cache = &own_cache;
  Sequence seq;
  std::vector<int32_t>& tokens = seq.tokens;
  GenerationStats& stats = seq.stats;
  std::deque<int32_t> ready;  // tokens the device made that were not handed out yet
  int64_t cached = 0;  // tokens whose K/V sit in the cache, at positions [0, cached)
  bool prefilled = false;

  Impl(const Backend& b, const Tokenizer& t, std::string_view prompt, const GenerateOptions& o,
       DeviceLoopPool* loops)
      : backend(b), meta(b.metadata()), options(validated(o)), sampler(o.sampling),
        seq(t, meta, options, encode_prompt(t, meta, prompt, "the prompt")) {
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
      const auto made = loop->advance(0);  // named: a temporary's element would dangle
      ready.assign(made[0].begin(), made[0].end());
      steps = 0;
    } else if (ready.empty()) {
      // Every token made so far has been handed out (an EOS would have ended the generation).
      steps = std::min({options.sync_every, options.max_new_tokens - stats.generated_tokens,
                        meta.context_length - loop->position(0)});
      if (steps <= 0) {  // the context is full (steps left would have ended the generation)
        cached = loop->position(0);
        steps = 1;
        return advance_on_host();
      }
      const auto made = loop->advance(steps);
      ready.assign(made[0].begin(), made[0].end());
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

  void step(std::string& out) { seq.accept(advance(), out); }
};

Generation::Generation(const Backend& backend, const Tokenizer& tokenizer,
                       std::string_view prompt, const GenerateOptions& options,
                       DeviceLoopPool* loops)
    : impl_(std::make_unique<Impl>(backend, tokenizer, prompt, options, loops)) {}

Generation::~Generation() = default;

bool Generation::next(std::string& piece) {
  piece.clear();
  while (piece.empty()) {
    if (impl_->seq.finished) {
      piece.swap(impl_->seq.tail);
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
  std::vector<Sequence> seqs;
  seqs.reserve(B);
  for (int64_t b = 0; b < B; ++b)
    seqs.emplace_back(tokenizer, meta, options,
                      encode_prompt(tokenizer, meta, prompts[b], "prompt " + std::to_string(b)));
  std::shared_ptr<DeviceLoop> loop = loops.acquire(B, options.sampling);
  int64_t live = B, steps_run = 0;

  auto ended = [&](int64_t b) {  // hands out what is left and stops decoding sequence b
    r.texts[b] += seqs[b].tail;
    --live;
    loop->park(b);
  };
  auto take = [&](const std::vector<std::vector<int32_t>>& made) {
    for (int64_t b = 0; b < B; ++b)
      for (int32_t t : made[b]) {
        if (seqs[b].finished) break;
        seqs[b].accept(t, r.texts[b]);
        if (seqs[b].finished) ended(b);
      }
  };

  const auto t0 = Clock::now();
  for (int64_t b = 0; b < B; ++b) loop->prefill(b, seqs[b].tokens);
  take(loop->advance(0));
  const auto t1 = Clock::now();
  while (live > 0) {
    int64_t steps = options.sync_every;
    for (int64_t b = 0; b < B; ++b)
      if (!seqs[b].finished)
        steps = std::min({steps, options.max_new_tokens - seqs[b].stats.generated_tokens,
                          ctx - loop->position(b)});
    if (steps <= 0) {  // some sequence filled the context
      for (int64_t b = 0; b < B; ++b)
        if (!seqs[b].finished && loop->position(b) >= ctx) {
          seqs[b].finish("length");
          ended(b);
        }
      continue;
    }
    take(loop->advance(steps));
    steps_run += steps;
  }
  const auto t2 = Clock::now();
  for (int64_t b = 0; b < B; ++b) r.stats[b] = seqs[b].stats;
  for (auto& s : r.stats) {
    s.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
    s.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
    s.decode_steps = steps_run;
  }
  return r;
}

}  // namespace babyrt
