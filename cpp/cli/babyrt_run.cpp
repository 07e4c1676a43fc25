// babyrt-run: generate text from an artifact on the command line. Several -p decode together
// as one batch; their texts are printed in order, each after a "--- i" line.
//   babyrt-run ARTIFACT -p PROMPT [-p PROMPT]... -n N [-t T] [-k K] [--top-p P] [--seed S] [--stop STR]...
//              [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--repeat R]
// Prints the text as it is made, then a tok/s line on stderr (with --repeat, the medians of R
// more silent runs after the printed one, which warms up; as babyrt bench measures). Exit 0 on success, 1 on a
// runtime error, 2 on a usage error; errors are one line on stderr.
#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "runtime/model.h"

namespace {

constexpr const char* kUsage =
    "usage: babyrt-run ARTIFACT_DIR -p PROMPT [-n N] [-t TEMPERATURE] [-k TOP_K] [--top-p P]\n"
    "                  [--seed S] [--stop STRING]... [--device cpu|cuda] [--dtype fp32|bf16|fp16]\n"
    "  -p PROMPT     the prompt; give several to decode them as one batch\n"
    "  -n N          new tokens to generate (default 256)\n"
    "  -t T          temperature, 0 = greedy (default 0.8)\n"
    "  -k K          top-k, 0 = off (default 0)\n"
    "  --top-p P     nucleus sampling in (0, 1], 1 = off (default 0.95)\n"
    "  --seed S      random seed (default: from the system)\n"
    "  --stop STR    stop before this text (repeatable)\n"
    "  --repeat R    then run R more times silently and report the median speeds\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename T>
T parse_number(const char* flag, const char* text) {
  T value{};
  const char* end = text + std::strlen(text);
  auto [ptr, ec] = std::from_chars(text, end, value);
  if (ec != std::errc() || ptr != end || ptr == text)
    throw UsageError(std::string(flag) + " expects a number, got '" + text + "'");
  return value;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double rate(double count, double seconds) { return seconds > 0 ? count / seconds : 0; }

}  // namespace

int main(int argc, char** argv) {
  std::string artifact;
  std::vector<std::string> prompts;
  bool have_seed = false;
  babyrt::GenerateOptions options;
  babyrt::LoadOptions load;
  int64_t repeat = 0;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> const char* {
        if (i + 1 >= argc) throw UsageError(a + " needs a value");
        return argv[++i];
      };
      if (a == "-h" || a == "--help") {
        std::fputs(kUsage, stdout);
        return 0;
      } else if (a == "-p" || a == "--prompt") {
        prompts.emplace_back(value());
      } else if (a == "-n") {
        options.max_new_tokens = parse_number<int64_t>("-n", value());
      } else if (a == "-t") {
        options.sampling.temperature = parse_number<float>("-t", value());
      } else if (a == "-k") {
        options.sampling.top_k = parse_number<int64_t>("-k", value());
      } else if (a == "--top-p") {
        options.sampling.top_p = parse_number<float>("--top-p", value());
      } else if (a == "--seed") {
        options.sampling.seed = parse_number<uint64_t>("--seed", value());
        have_seed = true;
      } else if (a == "--stop") {
        options.stop.emplace_back(value());
      } else if (a == "--device") {
        load.device = value();
      } else if (a == "--dtype") {
        load.dtype = value();
      } else if (a == "--repeat") {
        repeat = parse_number<int64_t>("--repeat", value());
        if (repeat < 0 || repeat > 1000) throw UsageError("--repeat must be in [0, 1000]");
      } else if (!a.empty() && a[0] == '-') {
        throw UsageError("unknown option " + a);
      } else if (artifact.empty()) {
        artifact = a;
      } else {
        throw UsageError("unexpected argument '" + a + "'");
      }
    }
    if (artifact.empty()) throw UsageError("missing ARTIFACT_DIR");
    if (prompts.empty()) throw UsageError("missing -p PROMPT");
  } catch (const UsageError& e) {
    std::fprintf(stderr, "babyrt-run: error: %s\n%s", e.what(), kUsage);
    return 2;
  }
  if (!have_seed) options.sampling.seed = std::random_device{}();

  try {
    auto model = babyrt::Model::load(artifact, load);
    if (prompts.size() > 1) {
      const babyrt::BatchResult r = model->generate_batch(prompts, options);
      int64_t made = 0;
      for (size_t i = 0; i < r.texts.size(); ++i) {
        std::printf("--- %zu\n%s\n", i, r.texts[i].c_str());
        made += r.stats[i].generated_tokens;
      }
      std::fflush(stdout);
      const auto& s = r.stats[0];
      std::fprintf(stderr, "batch of %zu: generated %lld tokens, %.1f tok/s in all | %s %s\n",
                   prompts.size(), static_cast<long long>(made),
                   rate(static_cast<double>(made), s.prefill_seconds + s.decode_seconds),
                   model->device().c_str(), model->dtype().c_str());
      return 0;
    }
    const std::string& prompt = prompts[0];
    babyrt::GenerationStats stats;
    model->generate(prompt, options, &stats, [](std::string_view piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    });
    std::fputc('\n', stdout);
    std::fflush(stdout);
    double pp = rate(stats.prompt_tokens, stats.prefill_seconds);
    double tg = rate(stats.decode_steps, stats.decode_seconds);
    if (repeat > 0) {
      std::vector<double> pps, tgs;
      for (int64_t r = 0; r < repeat; ++r) {
        model->generate(prompt, options, &stats);
        pps.push_back(rate(stats.prompt_tokens, stats.prefill_seconds));
        tgs.push_back(rate(stats.decode_steps, stats.decode_seconds));
      }
      pp = median(pps);
      tg = median(tgs);
    }
    std::fprintf(stderr,
                 "prompt %lld tokens, %.1f tok/s | generated %lld tokens, %.1f tok/s | %s | %s %s%s\n",
                 static_cast<long long>(stats.prompt_tokens), pp,
                 static_cast<long long>(stats.generated_tokens), tg, stats.finish_reason.c_str(),
                 model->device().c_str(), model->dtype().c_str(),
                 repeat > 0 ? (" | median of " + std::to_string(repeat) + " runs").c_str() : "");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "babyrt-run: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
