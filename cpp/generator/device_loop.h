// Decoding with the tokens kept on the device. Each step feeds the token it sampled back in
// as the next input, without the host: sampling runs on the device and the positions advance
// there. The host reads the new tokens back only after a run of steps (for streaming and stop
// checks). On CUDA, runs of 1, 2, 4, 8 and 16 steps are each captured once as a CUDA graph and
// replayed: one launch per 16 tokens, not one per token.
//
// The sequences of a batch each have their own cache row and position, so prompts of different
// lengths decode together.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "sampler/sampler.h"

namespace babyrt {

class DeviceLoop {
 public:
  DeviceLoop(const Backend& backend, int64_t batch, const SamplingParams& sampling);
  ~DeviceLoop();

  // A new generation's seed: the device's random numbers (one per sequence and position).
  void reseed(uint64_t seed);
  // Runs sequence b's prompt (its cache row only) and samples its first token.
  void prefill(int64_t b, const std::vector<int32_t>& ids);
  // Runs `steps` decode steps for every sequence, then returns, per sequence, each token made
  // since the last call (the first call after a prefill includes the prefill's token).
  // Every sequence must have room: position(b) + steps <= context length.
  std::vector<std::vector<int32_t>> advance(int64_t steps);
  // A finished sequence keeps decoding with the batch; parking puts it back at position 0 so
  // that it never runs out of room. Its tokens are no longer returned.
  void park(int64_t b);

  int64_t batch() const { return batch_; }
  // The position of the next token fed for sequence b (its cache holds [0, position)).
  int64_t position(int64_t b) const { return pos_host_[b]; }
  KVCache& cache() { return cache_; }
  const SamplingParams& sampling() const { return sampling_; }

 private:
  void step();          // one decode step, all on the device
  void run_steps(int64_t n);
  struct Graph;
  std::unique_ptr<Graph> capture(int64_t steps);  // CUDA only; null when capture failed
  at::Tensor sample(const at::Tensor& logits, const at::Tensor& uniform) const;

  const Backend& backend_;
  int64_t batch_;
  SamplingParams sampling_;
  KVCache cache_;
  at::Tensor tok_, pos_;  // [B, 1] int64: the token fed next and its position
  at::Tensor history_;    // [B, context + 1] int64: history_[b, p] = the token at position p
  at::Tensor uniform_;    // [B, context + 1] float: the random number used at each position
  std::vector<int64_t> pos_host_, fetched_;  // host copies; fetched_: last position returned
  std::vector<bool> parked_;
  int64_t eager_steps_ = 0;  // steps run before capture (warm-up of the TorchScript executor)
  // graphs_[i]: 2^i steps in one graph, captured the first time a run of that length is due.
  std::vector<std::unique_ptr<Graph>> graphs_;
  bool graph_failed_ = false;  // the step could not be captured: it runs eagerly
};

// Idle loops of one backend, reused by later generations so that a loop (its cache and its
// captured graph) is built once per batch size and sampling setting, not once per call.
class DeviceLoopPool {
 public:
  explicit DeviceLoopPool(const Backend& backend) : state_(std::make_shared<State>(backend)) {}
  // A loop for `batch` sequences with these sampling settings, reseeded; it goes back to the
  // pool when the last owner lets go.
  std::shared_ptr<DeviceLoop> acquire(int64_t batch, const SamplingParams& sampling);

 private:
  struct State {
    explicit State(const Backend& b) : backend(b) {}
    const Backend& backend;
    std::mutex mutex;
    std::vector<std::unique_ptr<DeviceLoop>> idle;
  };
  std::shared_ptr<State> state_;
};

// Whether generations on this backend decode through a DeviceLoop: KV-cache models on CUDA.
bool decodes_on_device(const Backend& backend);

}  // namespace babyrt
