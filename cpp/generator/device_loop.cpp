#include "generator/device_loop.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <random>

#ifdef BABYRT_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "errors.h"

namespace babyrt {
namespace {

// Steps run eagerly before the capture: the TorchScript profiling executor optimises the
// graph on its second run, and library workspaces get created outside the capture.
constexpr int64_t kWarmupSteps = 3;
constexpr size_t kMaxIdleLoops = 4;

bool same_sampling(const SamplingParams& a, const SamplingParams& b) {
  return a.temperature == b.temperature && a.top_k == b.top_k && a.top_p == b.top_p;
}

}  // namespace

#ifdef BABYRT_WITH_CUDA
struct DeviceLoop::Graph {
  at::cuda::CUDAGraph graph;
};
#else
struct DeviceLoop::Graph {};
#endif

bool decodes_on_device(const Backend& backend) {
  // BABYRT_DEVICE_LOOP=1 takes this path on the CPU too, so that CPU-only CI tests it.
  static const bool forced = [] {
    const char* v = std::getenv("BABYRT_DEVICE_LOOP");
    return v && std::string(v) == "1";
  }();
  return (backend.device().is_cuda() || forced) && backend.metadata().cache_kind == "kv";
}

DeviceLoop::DeviceLoop(const Backend& backend, int64_t batch, const SamplingParams& sampling)
    : backend_(backend),
      batch_(batch),
      sampling_(sampling),
      pos_host_(batch, 0),
      fetched_(batch, 0),
      parked_(batch, true) {
  validate(sampling);
  if (backend.metadata().cache_kind != "kv")
    throw ArgumentError("on-device decoding needs a KV-cache model");
  if (batch < 1) throw ArgumentError("batch must be >= 1, got " + std::to_string(batch));
  cache_ = backend.new_cache(batch);
  const int64_t ctx = backend.metadata().context_length;
  const auto ids = at::TensorOptions().dtype(at::kLong).device(backend.device());
  tok_ = at::zeros({batch, 1}, ids);
  pos_ = at::zeros({batch, 1}, ids);
  history_ = at::zeros({batch, ctx + 1}, ids);
  uniform_ = at::zeros({batch, ctx + 1}, ids.dtype(at::kFloat));
}

DeviceLoop::~DeviceLoop() = default;

void DeviceLoop::reseed(uint64_t seed) {
  if (sampling_.temperature == 0) return;
  std::mt19937_64 rng(seed);
  at::Tensor u = at::empty(uniform_.sizes(), at::kFloat);
  float* p = u.data_ptr<float>();
  for (int64_t i = 0; i < u.numel(); ++i) p[i] = static_cast<float>(rng() >> 40) * 0x1.0p-24f;
  uniform_.copy_(u);
}

// logits [B, V] float, uniform [B, 1] in [0, 1): the token ids [B, 1]. The same rules as the
// host Sampler: top-k first, then the smallest prefix of the rest whose mass passes top_p,
// then inverse-CDF sampling with the given random number.
at::Tensor DeviceLoop::sample(const at::Tensor& logits, const at::Tensor& uniform) const {
  // Greedy here serves prefill only: decode steps take greedy_advance (see step()).
  if (sampling_.temperature == 0) return logits.argmax(-1, /*keepdim=*/true);
  const int64_t V = logits.size(-1);
  at::Tensor vals = at::softmax(logits / sampling_.temperature, -1), idx;
  if (sampling_.top_k > 0 && sampling_.top_k < V)
    std::tie(vals, idx) = at::topk(vals, sampling_.top_k, -1, /*largest=*/true, /*sorted=*/true);
  else if (sampling_.top_p < 1)
    std::tie(vals, idx) = at::sort(vals, -1, /*descending=*/true);
  if (sampling_.top_p < 1) {
    const at::Tensor cum = vals.cumsum(-1);
    vals = vals * ((cum - vals) <= cum.narrow(-1, cum.size(-1) - 1, 1) * sampling_.top_p);
  }
  const at::Tensor cdf = vals.cumsum(-1);
  const int64_t last = cdf.size(-1) - 1;
  const at::Tensor r = uniform * cdf.narrow(-1, last, 1);
  const at::Tensor j = at::searchsorted(cdf, r, /*out_int32=*/false, /*right=*/true).clamp_max(last);
  return idx.defined() ? idx.gather(-1, j) : j;
}

void DeviceLoop::step() {
  const at::Tensor logits = backend_.forward(tok_, pos_, cache_).select(1, 0);
  if (sampling_.temperature == 0) {
    // argmax, the token fed next, the position and the history in one op (one kernel on CUDA).
    static auto greedy_advance =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("babyrt::greedy_advance", "")
            .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    greedy_advance.call(logits, tok_, pos_, history_);
    return;
  }
  const at::Tensor next = sample(logits, uniform_.gather(1, pos_));
  tok_.copy_(next);
  pos_.add_(1);
  history_.scatter_(1, pos_, next);
}

void DeviceLoop::prefill(int64_t b, const std::vector<int32_t>& ids) {
  const auto n = static_cast<int64_t>(ids.size());
  const int64_t ctx = backend_.metadata().context_length;
  if (b < 0 || b >= batch_) throw ArgumentError("sequence " + std::to_string(b) + " is not in the batch");
  if (n < 1 || n > ctx)
    throw ArgumentError("a prompt of " + std::to_string(n) + " tokens does not fit the context of " +
                        std::to_string(ctx));
  c10::InferenceMode guard;
  const auto dev = at::TensorOptions().dtype(at::kLong).device(backend_.device());
  const at::Tensor tokens =
      at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), dev.device(at::kCPU)).to(dev).unsqueeze(0);
  KVCache row{cache_.k.narrow(1, b, 1), cache_.v.narrow(1, b, 1)};
  const at::Tensor logits =
      backend_.forward(tokens, at::arange(n, dev).unsqueeze(0), row).select(1, n - 1);
  const at::Tensor first = sample(logits, uniform_.narrow(0, b, 1).narrow(1, n - 1, 1));
  tok_.narrow(0, b, 1).copy_(first);
  pos_.narrow(0, b, 1).fill_(n);
  history_.narrow(0, b, 1).narrow(1, n, 1).copy_(first);
  pos_host_[b] = n;
  fetched_[b] = n - 1;
  parked_[b] = false;
}

void DeviceLoop::park(int64_t b) {
  c10::InferenceMode guard;
  parked_[b] = true;
  pos_.narrow(0, b, 1).fill_(0);
  pos_host_[b] = 0;
}

std::vector<std::vector<int32_t>> DeviceLoop::advance(int64_t steps) {
  const int64_t ctx = backend_.metadata().context_length;
  if (steps < 0 || steps > ctx) throw Error("advance: bad step count " + std::to_string(steps));
  for (int64_t b = 0; b < batch_; ++b) {
    if (parked_[b] && pos_host_[b] != 0) park(b);  // back to the start: room for any run
    if (!parked_[b] && pos_host_[b] + steps > ctx)
      throw Error("advance: sequence " + std::to_string(b) + " would run past the context");
  }
  run_steps(steps);
  int64_t lo = ctx + 1, hi = -1;
  for (int64_t b = 0; b < batch_; ++b) {
    pos_host_[b] += steps;
    if (parked_[b]) continue;
    lo = std::min(lo, fetched_[b] + 1);
    hi = std::max(hi, pos_host_[b]);
  }
  std::vector<std::vector<int32_t>> out(batch_);
  if (hi < lo) return out;
  c10::InferenceMode guard;
  const at::Tensor h = history_.narrow(1, lo, hi + 1 - lo).to(at::kCPU).contiguous();
  const int64_t* p = h.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch_; ++b) {
    if (parked_[b]) continue;
    for (int64_t q = fetched_[b] + 1; q <= pos_host_[b]; ++q)
      out[b].push_back(static_cast<int32_t>(p[b * h.size(1) + q - lo]));
    fetched_[b] = pos_host_[b];
  }
  return out;
}

#ifdef BABYRT_WITH_CUDA
// The most steps one graph holds: a power of two, 16 unless BABYRT_GRAPH_STEPS says otherwise
// (1 replays one graph per token, to measure what fewer launches win).
static int64_t max_graph_steps() {
  static const int64_t most = [] {
    const char* v = std::getenv("BABYRT_GRAPH_STEPS");
    const int64_t want = std::clamp<int64_t>(v ? std::atoll(v) : 16, 1, 64);
    int64_t p = 1;
    while (2 * p <= want) p *= 2;
    return p;
  }();
  return most;
}

std::unique_ptr<DeviceLoop::Graph> DeviceLoop::capture(int64_t steps) {
  // A capture cannot use the default stream: it runs on a side stream, after everything queued.
  c10::cuda::getCurrentCUDAStream().synchronize();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  auto g = std::make_unique<Graph>();
  {
    const c10::cuda::CUDAStreamGuard stream_guard(side);
    try {
      g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      for (int64_t s = 0; s < steps; ++s) step();
      g->graph.capture_end();
    } catch (const std::exception&) {
      // Something in the step cannot be captured: decode without graphs from now on.
      cudaStreamCaptureStatus status;
      if (cudaStreamIsCapturing(side.stream(), &status) == cudaSuccess &&
          status != cudaStreamCaptureStatusNone) {
        cudaGraph_t broken = nullptr;
        cudaStreamEndCapture(side.stream(), &broken);
        if (broken) cudaGraphDestroy(broken);
      }
      (void)cudaGetLastError();
      graph_failed_ = true;
      g.reset();
    }
  }
  side.synchronize();
  return g;
}
#endif

void DeviceLoop::run_steps(int64_t n) {
  c10::InferenceMode guard;
#ifdef BABYRT_WITH_CUDA
  if (backend_.device().is_cuda() && !graph_failed_) {
    const c10::cuda::CUDAGuard device_guard(backend_.device());
    if (eager_steps_ < kWarmupSteps && n > 0) {
      c10::cuda::getCurrentCUDAStream().synchronize();
      c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
      {
        const c10::cuda::CUDAStreamGuard stream_guard(side);
        for (; n > 0 && eager_steps_ < kWarmupSteps; --n, ++eager_steps_) step();
      }
      side.synchronize();
    }
    // n as a sum of powers of two, largest first: a replay per term. A graph captures steps
    // without running them, so each is replayed for the run it was captured for.
    while (n > 0 && !graph_failed_) {
      size_t i = 0;
      while ((int64_t{2} << i) <= std::min(n, max_graph_steps())) ++i;
      if (graphs_.size() <= i) graphs_.resize(i + 1);
      if (!graphs_[i] && !(graphs_[i] = capture(int64_t{1} << i))) break;
      graphs_[i]->graph.replay();
      n -= int64_t{1} << i;
    }
  }
#endif
  for (; n > 0; --n) step();
}

std::shared_ptr<DeviceLoop> DeviceLoopPool::acquire(int64_t batch, const SamplingParams& sampling) {
  std::unique_ptr<DeviceLoop> loop;
  {
    const std::lock_guard<std::mutex> lock(state_->mutex);
    auto& idle = state_->idle;
    for (auto it = idle.begin(); it != idle.end(); ++it)
      if ((*it)->batch() == batch && same_sampling((*it)->sampling(), sampling)) {
        loop = std::move(*it);
        idle.erase(it);
        break;
      }
  }
  if (!loop) loop = std::make_unique<DeviceLoop>(state_->backend, batch, sampling);
  loop->reseed(sampling.seed);
  std::shared_ptr<State> state = state_;
  return std::shared_ptr<DeviceLoop>(loop.release(), [state](DeviceLoop* l) {
    std::unique_ptr<DeviceLoop> owned(l);
    const std::lock_guard<std::mutex> lock(state->mutex);
    if (state->idle.size() >= kMaxIdleLoops) state->idle.erase(state->idle.begin());
    state->idle.push_back(std::move(owned));
  });
}

}  // namespace babyrt
