// babyrt's error model: every failure the runtime reports is one of these types.
// The Python bindings map each to an exception class of the same name; the CLI prints
// what() on one line and exits non-zero.
#pragma once
#include <stdexcept>
#include <string>

namespace babyrt {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A missing, truncated or inconsistent artifact (model file or metadata).
struct ArtifactError : Error {
  using Error::Error;
};
// A bad tokenizer.bin, or text the tokenizer cannot represent.
struct TokenizerError : Error {
  using Error::Error;
};
// A bad argument from the caller: sampling values, lengths, prompts.
struct ArgumentError : Error {
  using Error::Error;
};
// A device that is absent or ran out of memory.
struct DeviceError : Error {
  using Error::Error;
};

}  // namespace babyrt
