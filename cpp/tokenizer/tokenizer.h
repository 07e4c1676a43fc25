// Reader for llama2.c's tokenizer.bin, with encode and decode.
//
// Layout (little-endian, no padding, no count: the model's vocab_size says how many records):
//   uint32 max_token_length
//   vocab_size x { float32 score; uint32 len; len bytes of the piece, UTF-8, no terminator }
// Pieces use ' ' where sentencepiece has U+2581, and byte-fallback pieces are the text "<0xHH>".
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace babyrt {

struct TokenizerOptions {
  int64_t vocab_size = 0;  // records expected in the file
  int64_t bos_id = -1;     // -1: none
  int64_t eos_id = -1;
  // sentencepiece: a dummy-prefix space on encode (stripped again on decode), score-ordered
  // merges and byte fallback. Otherwise one piece per character and no merges.
  bool sentencepiece = false;
};

class Tokenizer {
 public:
  // Throws TokenizerError naming `path` when the file is missing, truncated, or holds a
  // different number of records than options.vocab_size.
  static Tokenizer from_file(const std::string& path, const TokenizerOptions& options);
  static Tokenizer from_bytes(std::string_view data, const TokenizerOptions& options,
                              const std::string& origin);

  // Sentencepiece: merges the best-scoring adjacent pair first (leftmost on ties), as
  // sentencepiece's BPE does; characters with no piece fall back to <0xHH> byte pieces, or
  // <unk>. Char: each character must be in the vocab, else TokenizerError.
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const;

  // The whole text of `ids`, as sentencepiece decodes it: control tokens dropped, byte pieces
  // joined into UTF-8, the dummy-prefix space removed. Invalid UTF-8 becomes U+FFFD.
  std::string decode(const std::vector<int32_t>& ids) const;

  // The raw bytes that token `id` adds to a text that continues after `prev` (-1: none).
  // After BOS the leading space is dropped, as llama2.c does. May be incomplete UTF-8.
  std::string_view piece_bytes(int32_t prev, int32_t id) const;

  int64_t vocab_size() const { return static_cast<int64_t>(pieces_.size()); }
  const std::string& piece(int32_t id) const;
  float score(int32_t id) const;

 private:
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  int32_t lookup(std::string_view s) const;  // -1 when absent or not matchable
  void check_id(int32_t id) const;

  TokenizerOptions options_;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<std::string> bytes_;  // what each token decodes to (byte pieces: one byte)
  std::unordered_map<std::string, int32_t, Hash, std::equal_to<>> index_;
  int32_t byte_ids_[256];
  bool has_byte_fallback_ = false;
  int32_t unk_id_ = -1;
};

// Turns a stream of raw bytes into valid UTF-8 text, holding back an incomplete trailing
// character until the bytes that finish it arrive.
class Utf8Stream {
 public:
  std::string push(std::string_view bytes);
  std::string finish();  // whatever is held back, invalid parts as U+FFFD

 private:
  std::string pending_;
};

// Replace every invalid UTF-8 sequence in `bytes` with U+FFFD.
std::string sanitize_utf8(std::string_view bytes);

}  // namespace babyrt
